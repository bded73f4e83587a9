"""The training loop: augmentation on the fly, SGD with warm-up and decay, label smoothing, weight EMA."""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.config import TrainConfig
from training.data import LabelledImages


@dataclass
class History:
    """One row per epoch; plotted as curves and saved in metrics.json."""

    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    # cuBLAS repeats its sums only with a fixed workspace; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(x: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random mirror, translation (reflect padding) and cutout, drawn per image."""
    n, _, height, width = x.shape
    device = x.device
    if config.flip:
        mirror = torch.rand(n, device=device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if config.translate:
        pad = config.translate
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if config.cutout:
        size = config.cutout
        cy = torch.randint(0, height, (n,), device=device, generator=generator) - size // 2
        cx = torch.randint(0, width, (n,), device=device, generator=generator) - size // 2
        ys = torch.arange(height, device=device)[None, :]
        xs = torch.arange(width, device=device)[None, :]
        in_rows = (ys >= cy[:, None]) & (ys < cy[:, None] + size)
        in_cols = (xs >= cx[:, None]) & (xs < cx[:, None] + size)
        x = x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
    return x


def cutmix(x: torch.Tensor, targets: torch.Tensor, probability: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """With ``probability``, paste a random box from a shuffled copy of the batch into every image (CutMix).

    Returns the images, the pasted images' targets and the share of each image that stayed its own; the loss weighs
    the two targets by area. Unmixed batches come back as they were, with a share of 1.
    """
    device = x.device
    if probability <= 0 or float(torch.rand((), device=device, generator=generator)) >= probability:
        return x, targets, 1.0
    n, _, height, width = x.shape
    # Box area ~ uniform(0, 1) of the image: Beta(1, 1), drawn with the run's generator so runs repeat.
    area = float(torch.rand((), device=device, generator=generator))
    box_h, box_w = round(height * math.sqrt(area)), round(width * math.sqrt(area))
    top = int(torch.randint(0, height - box_h + 1, (), device=device, generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (), device=device, generator=generator))
    partner = torch.randperm(n, device=device, generator=generator)
    mixed = x.clone()
    mixed[:, :, top:top + box_h, left:left + box_w] = x[partner, :, top:top + box_h, left:left + box_w]
    return mixed, targets[partner], 1.0 - box_h * box_w / (height * width)


def regularised_share(config: TrainConfig, epoch: int) -> float:
    """How far ``epoch`` (1-based) is into the epochs that CutMix and the teacher act on: the focus epochs, or all
    epochs when there are none. 0 before them, then rising linearly to 1 at the last epoch."""
    span = config.focus_epochs or config.epochs
    into = epoch - (config.epochs - span)
    return into / span if into > 0 else 0.0


def self_distill_share(config: TrainConfig, epoch: int) -> float:
    """The EMA teacher's share of the target in ``epoch``: rising linearly to ``self_distill``."""
    return config.self_distill * regularised_share(config, epoch)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decayed = [p for p in model.parameters() if p.ndim > 1]
    not_decayed = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 1000,
                   channels_last: bool = False) -> torch.Tensor:
    model.eval()
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size].to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        outputs.append(model(batch).float().cpu())
    return torch.cat(outputs)


class CheckpointError(ValueError):
    """A checkpoint that cannot continue this run."""


def save_checkpoint(path: Path, **state) -> None:
    """Everything needed to go on after ``state['epoch']``; written whole or not at all."""
    staging = path.with_name(path.name + ".partial")
    torch.save(state, staging)
    os.replace(staging, path)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the processor's, for the record of where each epoch was trained."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def changed_settings(saved: dict, config: TrainConfig) -> dict:
    return {name: [saved.get(name), value] for name, value in config.to_dict().items() if saved.get(name) != value}


class Trainer:
    """One training run, as small named steps: the epoch plan, a step, the loss, validation, checkpoints.

    ``fit`` below is the loop over them. The last ``focus_epochs`` see only the product labels (see
    ``TrainConfig.focus_epochs``); CutMix and the EMA teacher act on those epochs.
    """

    def __init__(self, config: TrainConfig, model: nn.Module, train_inputs: np.ndarray, train_labels: np.ndarray,
                 product_classes: int):
        self.config = config
        self.device = pick_device()
        if config.threads and self.device.type == "cpu":
            torch.set_num_threads(config.threads)
        self.use_bf16 = config.bf16 and bf16_supported(self.device)
        self.channels_last = config.arch == "convnet"
        self.product_classes = product_classes
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
                    if config.ema_decay > 0 else None)
        self.optimizer = make_optimizer(self.model, config)
        self.x_train = torch.from_numpy(train_inputs).to(self.device)
        self.y_train = torch.from_numpy(train_labels).to(self.device)
        self.pools = self.epoch_pools()
        total_steps = sum(self.steps_in(pool) for pool in self.pools)
        warmup_steps = max(1, int(config.warmup_epochs * self.steps_in(self.x_train)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.history = History()
        self.epochs_done, self.earlier_seconds = 0, 0.0
        # Where each stretch of epochs ran: a run resumed elsewhere (a GPU, then a laptop) says so in its metadata.
        self.earlier_stretches: list[dict] = []
        self.stretch = {"device": self.device.type, "hardware": hardware_name(self.device), "torch": torch.__version__,
                        "bf16": self.use_bf16, "first_epoch": 1}

    def steps_in(self, pool: torch.Tensor) -> int:
        return math.ceil(len(pool) / self.config.batch_size)

    def first_focus_epoch(self) -> int:
        return self.config.epochs - self.config.focus_epochs + 1

    def epoch_pools(self) -> list[torch.Tensor]:
        """The training images each epoch draws from: all of them, then the product labels' in the focus epochs."""
        everything = torch.arange(len(self.x_train), device=self.device)
        product_only = everything[self.y_train < self.product_classes]
        return [product_only if epoch >= self.first_focus_epoch() else everything
                for epoch in range(1, self.config.epochs + 1)]

    @property
    def evaluated(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def resume(self, checkpoint: Path) -> dict:
        """Load a checkpoint of this run; a finished run loads too, so its model can be exported again."""
        state = torch.load(checkpoint, map_location=self.device, weights_only=False)  # written by save(), below
        if state["images"] != len(self.x_train) or state["epoch"] > self.config.epochs:
            raise CheckpointError(f"{checkpoint} is from another run ({state['images']} training images, "
                                  f"{state['epoch']} epochs done); delete it or pass another --checkpoint.")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.earlier_stretches = state.get("stretches", [])  # absent from checkpoints older than the record
        saved_on = self.earlier_stretches[-1]["device"] if self.earlier_stretches else self.device.type
        if saved_on == self.device.type:
            self.generator.set_state(state["generator"].cpu())  # a byte tensor on the CPU, whatever the device
        else:  # a CUDA generator's state means nothing to the CPU's: the draws go on from a seed of their own
            self.generator.manual_seed(self.config.seed + state["epoch"])
        self.history.rows = state["history"]
        self.epochs_done, self.earlier_seconds = state["epoch"], state["seconds"]
        self.stretch["first_epoch"] = state["epoch"] + 1
        resumed = {"after_epoch": state["epoch"], "changed": changed_settings(state["config"], self.config)}
        print(f"resuming after epoch {state['epoch']} from {checkpoint}"
              + (f"; changed since: {resumed['changed']}" if resumed["changed"] else ""))
        return resumed

    def save(self, checkpoint: Path, seconds: float) -> None:
        save_checkpoint(checkpoint, epoch=self.epochs_done, images=len(self.x_train), config=self.config.to_dict(),
                        model=self.model.state_dict(), ema=self.ema.state_dict() if self.ema is not None else None,
                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        generator=self.generator.get_state(), history=self.history.rows, seconds=seconds,
                        stretches=self.stretches())

    def stretches(self) -> list[dict]:
        """The stretches of epochs so far, this process's included once it has trained one."""
        if self.epochs_done < self.stretch["first_epoch"]:
            return list(self.earlier_stretches)
        return [*self.earlier_stretches, {**self.stretch, "last_epoch": self.epochs_done}]

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, pasted_targets: torch.Tensor, kept: float,
             focused: bool, teacher_share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-smoothed cross-entropy, weighed by area under CutMix, blended with the EMA teacher's softmax."""
        smoothing = self.config.label_smoothing
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.model(inputs)
            if focused:
                logits = logits[:, :self.product_classes]
            scores = logits.float()
            loss = kept * F.cross_entropy(scores, targets, label_smoothing=smoothing)
            if kept < 1.0:
                loss = loss + (1.0 - kept) * F.cross_entropy(scores, pasted_targets, label_smoothing=smoothing)
            if teacher_share:
                with torch.no_grad():
                    taught = torch.softmax(self.ema.module(inputs)[:, :scores.shape[1]].float(), dim=1)
                loss = (1.0 - teacher_share) * loss + teacher_share * F.cross_entropy(scores, taught)
        return loss, logits

    def step(self, index: torch.Tensor, epoch: int) -> tuple[float, int]:
        """One optimisation step on the images at ``index``; returns the summed loss and the number correct."""
        mixing = self.config.cutmix if regularised_share(self.config, epoch) else 0.0
        teacher_share = self_distill_share(self.config, epoch) if self.ema is not None else 0.0
        inputs = augment(self.x_train[index], self.config, self.generator)
        targets = self.y_train[index]
        inputs, pasted_targets, kept = cutmix(inputs, targets, mixing, self.generator)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        loss, logits = self.loss(inputs, targets, pasted_targets, kept, epoch >= self.first_focus_epoch(),
                                 teacher_share)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.item() * len(index), int((logits.argmax(1) == targets).sum().item())

    def train_epoch(self, epoch: int, bar: tqdm) -> dict:
        self.model.train()
        if self.ema is not None and self_distill_share(self.config, epoch):
            self.ema.module.eval()
        pool = self.pools[epoch - 1]
        order = pool[torch.randperm(len(pool), device=self.device, generator=self.generator)]
        loss_sum, correct, seen = 0.0, 0, 0
        bar.set_description(f"epoch {epoch}/{self.config.epochs}"
                            f"{' (focus)' if epoch >= self.first_focus_epoch() else ''}")
        for step in range(self.steps_in(pool)):
            index = order[step * self.config.batch_size:(step + 1) * self.config.batch_size]
            step_loss, step_correct = self.step(index, epoch)
            loss_sum, correct, seen = loss_sum + step_loss, correct + step_correct, seen + len(index)
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}

    def validate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> dict:
        """Loss and accuracy of the model that will be exported, over the product labels' logits."""
        logits = predict_logits(self.evaluated, x_val, self.device,
                                channels_last=self.channels_last)[:, :self.product_classes]
        return {"val_loss": F.cross_entropy(logits, y_val).item(),
                "val_accuracy": (logits.argmax(1) == y_val).float().mean().item()}

    def final_model(self) -> nn.Module:
        final = copy.deepcopy(self.evaluated).float().to("cpu")
        return final.to(memory_format=torch.contiguous_format).eval()


def fit(config: TrainConfig, train: LabelledImages, train_inputs: np.ndarray, val: LabelledImages,
        val_inputs: np.ndarray, model: nn.Module, product_classes: int,
        progress: bool = True, checkpoint: Path | None = None) -> tuple[nn.Module, History, dict]:
    """Train ``model`` on normalised inputs; return the model to export (the EMA when enabled) and the history.

    With ``checkpoint``, the whole training state is saved there after every epoch, and a run that finds the file
    goes on from where it stopped (bit for bit, under the same settings); a finished run's file is exported as is.
    Progress is a bar when ``progress`` and stderr is a terminal, one line per epoch either way.
    """
    trainer = Trainer(config, model, train_inputs, train.labels, product_classes)
    resumed = trainer.resume(checkpoint) if checkpoint is not None and checkpoint.exists() else None
    x_val, y_val = torch.from_numpy(val_inputs), torch.from_numpy(val.labels)
    started = time.perf_counter() - trainer.earlier_seconds
    total_steps = sum(trainer.steps_in(pool) for pool in trainer.pools)
    bar = tqdm(total=total_steps, unit="step", disable=None if progress else True, dynamic_ncols=True,
               initial=sum(trainer.steps_in(pool) for pool in trainer.pools[:trainer.epochs_done]))
    for epoch in range(trainer.epochs_done + 1, config.epochs + 1):
        row = {"epoch": epoch, "focus": epoch >= trainer.first_focus_epoch(), **trainer.train_epoch(epoch, bar),
               **trainer.validate(x_val, y_val), "lr": trainer.scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - started}
        trainer.history.add(**row)
        trainer.epochs_done = epoch
        bar.write(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                  f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}  ({row['seconds']:.0f} s)")
        sys.stdout.flush()  # a log file sees each epoch as it ends
        if checkpoint is not None:
            trainer.save(checkpoint, row["seconds"])
    bar.close()
    stretches = trainer.stretches()
    run_info = {"device": ", ".join(dict.fromkeys(s["device"] for s in stretches)) or str(trainer.device),
                "bf16": all(s["bf16"] for s in stretches) if stretches else trainer.use_bf16,
                "wall_time_s": round(time.perf_counter() - started, 1), "steps": total_steps,
                "trained_on": stretches}
    if resumed is not None:
        run_info["resumed"] = resumed
    return trainer.final_model(), trainer.history, run_info
