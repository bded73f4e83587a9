"""Every hyperparameter in one commented place. The whole block is saved in the model's metadata.json.

Each field's annotation carries its one-line description, which is also its ``--help`` text; any field can be
overridden on the command line (``--epochs 40``). A preset is a named set of overrides on top of these defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, get_type_hints


@dataclass(frozen=True)
class TrainConfig:
    # What is trained.
    arch: Annotated[str, "network layout: 'convnet' (accurate default) or 'lenet' (the classic layout)"] = "convnet"
    width: Annotated[int, "convnet: channels of the first block; later blocks use 2x and 4x"] = 64
    # Two more convs after block 3, where the features are most abstract (cat vs dog), for 13 % more step time:
    # single view 91.40 % vs 90.90 % with v3's recipe.
    residual: Annotated[str, "convnet: blocks followed by a residual pair of convs, e.g. '3' or '1,3'; '' = none"] = "3"
    # Optimisation: SGD with Nesterov momentum; the learning rate warms up linearly from zero, then falls linearly
    # to zero.
    epochs: Annotated[int, "passes over the training images"] = 80
    batch_size: Annotated[int, "images per optimisation step"] = 256
    lr: Annotated[float, "peak learning rate, reached at the end of warm-up"] = 0.2
    momentum: Annotated[float, "SGD Nesterov momentum"] = 0.9
    weight_decay: Annotated[float, "L2 penalty on conv and linear weights (not on batch-norm or biases)"] = 5e-4
    warmup_epochs: Annotated[float, "epochs of linear learning-rate warm-up from zero"] = 2.0
    label_smoothing: Annotated[float, "share of each target spread evenly over all classes"] = 0.2
    ema_decay: Annotated[float, "per-step decay of the weight average that is evaluated and exported; 0 = off"] = 0.995
    # Augmentation, applied per image on the fly.
    flip: Annotated[bool, "mirror half of the training images left-right"] = True
    translate: Annotated[int, "shift images by up to this many pixels (reflect padding)"] = 4
    cutout: Annotated[int, "side in pixels of a random square blanked per image; 0 = off"] = 8
    # CutMix fights the memorising that sets in once only the four labels are left (without it, train accuracy
    # reaches 99 % and validation stalls): 91.85 % with it (36 + 44 epochs) vs 91.45 % without (35 + 35).
    cutmix: Annotated[float, "share of batches mixed by CutMix in the focus epochs (all epochs if none)"] = 0.5
    # Self-distillation: the weight average (EMA) is a steadier, better model than the one being trained, so its
    # softmax on the same augmented batch is a better target than a smoothed one-hot label (it knows which cats look
    # like dogs). Its share of the target rises linearly to this value over the focus epochs. From the same 36
    # ten-class epochs (residual block 3): 92.35 % with 0.6 vs 91.50 % without.
    self_distill: Annotated[float, "final share of the EMA's softmax in the focus epochs' targets; 0 = off"] = 0.6
    # Data.
    val_fraction: Annotated[float, "share of each label held out for validation (stratified)"] = 0.1
    extra_classes: Annotated[bool, "train on --extra-data's classes too (as extra outputs dropped at export)"] = True
    # Extra classes teach general features; then the last focus_epochs train on the four labels alone (scored over
    # their four logits, as exported). At width 32 and equal compute: 87.5 % vs 86.4 % for all classes throughout.
    # But the auxiliary outputs go stale while the labels are focused on, and "none of these" reads them. Validation
    # accuracy / held-out other classes flagged at 5 % of the labels' own, H200, seed 0: of 80 epochs, 20 focused
    # 91.50 / 93.5 %, 30 focused 91.80 / 91.0 %, 44 focused 92.35 / 73.0 % (91.80 / 76.2 % on a 2-core CPU: the
    # hardware alone moves accuracy half a point); of 160, 60 focused 92.30 / 85.5 % (gpu), 88 focused 92.25 /
    # 48.1 %; 132 of 240, 92.00 / 30.9 %.
    focus_epochs: Annotated[int, "of --epochs, the last ones train on the product labels only (with extra data)"] = 44
    # Export.
    tta_flip: Annotated[bool, "average logits with the mirrored image in the exported graph (2x latency)"] = True
    # Run.
    seed: Annotated[int, "seeds the split, initialisation, shuffling and augmentation"] = 0
    bf16: Annotated[bool, "bfloat16 autocast where the processor supports it (CUDA or AVX512-BF16 CPUs)"] = True
    threads: Annotated[int, "CPU threads for torch; 0 = all cores"] = 0

    def __post_init__(self) -> None:
        """Refuse nonsense before minutes of data loading; each message names the flag."""
        checks = [
            (self.arch in ("convnet", "lenet"), f"--arch must be 'convnet' or 'lenet', not {self.arch!r}"),
            (self.width >= 4, "--width must be at least 4"),
            (self.residual_blocks() is not None, f"--residual lists convnet blocks 1, 2 or 3 separated by commas "
                                                 f"(e.g. '3' or '1,3'), or '' for none; not {self.residual!r}"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (self.translate >= 0 and self.cutout >= 0, "--translate and --cutout must not be negative"),
            (0 <= self.cutmix <= 1, "--cutmix must be between 0 and 1"),
            (0 <= self.self_distill < 1, "--self-distill must be in [0, 1)"),
            (not self.self_distill or self.ema_decay > 0, "--self-distill needs --ema-decay > 0: the weight average "
                                                          "is the teacher"),
            (0 < self.val_fraction < 1, "--val-fraction must be between 0 and 1"),
            (0 <= self.focus_epochs <= self.epochs, "--focus-epochs must be between 0 and --epochs"),
            (self.threads >= 0, "--threads must not be negative"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def residual_blocks(self) -> tuple[int, ...] | None:
        """'1,3' → (1, 3); None when the text is not a list of convnet blocks."""
        parts = [part for part in self.residual.replace(" ", "").split(",") if part]
        if not all(part in ("1", "2", "3") for part in parts):
            return None
        return tuple(sorted({int(part) for part in parts}))

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> TrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[str, dict] = {
    # The recipe for a 2-core CPU, about 55 minutes alone: convnet v5, 91.80 % validation accuracy (INT8 91.95 %).
    "default": {},
    # The shipped convnet (v6): twice the epochs, 100 of them over all ten classes, then 60 focused. 5 minutes on an
    # H200 (three runs sharing it); about 2 hours on a 2-core CPU. 92.30 % (INT8 92.20 %), 85.5 % of other classes
    # flagged.
    "gpu": {"epochs": 160, "focus_epochs": 60},
    # Quick iteration: >= 85 % in under 5 minutes on a 2-core CPU (the four labels only, a narrower net).
    "fast": {"width": 32, "residual": "", "epochs": 20, "extra_classes": False, "focus_epochs": 0, "ema_decay": 0.99,
             "cutmix": 0.0, "self_distill": 0.0},
    # The classic LeNet layout, as drawn in the textbooks (no batch norm, no cutout).
    "lenet": {
        "arch": "lenet", "residual": "", "epochs": 30, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4,
        "label_smoothing": 0.0, "cutout": 0, "translate": 2, "ema_decay": 0.0, "extra_classes": False,
        "focus_epochs": 0, "cutmix": 0.0, "self_distill": 0.0,
        "bf16": False,
    },
    # A seconds-long run for tests and smoke checks.
    "smoke": {"arch": "lenet", "epochs": 1, "batch_size": 32, "lr": 0.01, "ema_decay": 0.0, "bf16": False,
              "extra_classes": False, "focus_epochs": 0, "cutmix": 0.0, "self_distill": 0.0},
}


def field_help() -> dict[str, tuple[type, str, object]]:
    """name → (type, description, default), read from the annotations above."""
    hints = get_type_hints(TrainConfig, include_extras=True)
    out = {}
    for f in fields(TrainConfig):
        hint = hints[f.name]
        out[f.name] = (hint.__origin__, hint.__metadata__[0], f.default)
    return out


def from_preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return TrainConfig(**PRESETS[name]).with_overrides(**overrides)
