"""Command line: ``python -m training train ...`` and ``python -m training evaluate ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from service import contract
from service.model import ModelLoadError, OnnxModel
from service.preprocessing import InputSpec, normalize
from training import data
from training.config import PRESETS, TrainConfig, field_help, from_preset
from training.data import PRODUCT_LABELS, DataError
from training.evaluate import classification_metrics, plot_confusion
from training.export import ParityError
from training.models import build

DESCRIPTION = """\
Train the four-class ConvNet (dog, cat, boat, bird), evaluate it, and publish it to the model store.

  python -m training train --data ../shared/data/cifar4/train                  # the accurate default, 'convnet'
  python -m training train --data DATA --extra-data EXTRA --preset gpu       # the shipped convnet (a GPU's run)
  python -m training train --data DATA --preset fast                          # a few minutes, for iteration
  python -m training train --data DATA --preset lenet                         # the classic LeNet layout
  python -m training train --data DATA --epochs 40 --lr 0.1                   # override any hyperparameter
  python -m training evaluate model_store/convnet/4 --data cifar-10-batches-py --split test

DATA is a folder with one sub-folder per label (dog/ cat/ boat/ bird/ of images), or CIFAR-10's python
batches (cifar-10-batches-py; 'ship' is used as 'boat'). Each run writes the next version,
model_store/<name>/<version>/, with model.onnx, inspect.onnx, metadata.json, metrics.json and plots. <name> is the
architecture's (convnet, lenet) for the default, gpu and lenet presets, and <arch>-<preset> for the others (a fast run
publishes convnet-fast/<n>, never a version of the convnet that serves); --name chooses another.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,requantize}")
    train_parser = commands.add_parser("train", help="train, evaluate, export and publish a model")
    train_parser.add_argument("--data", required=True, type=Path, help="labelled images (folder tree or CIFAR batches)")
    train_parser.add_argument("--extra-data", type=Path, help="images of other classes, learned as auxiliary outputs")
    train_parser.add_argument("--store", type=Path, default=Path("model_store"),
                              help="model store to publish into (default: model_store)")
    train_parser.add_argument("--name", help="model name in the store (default: the architecture's name for the "
                                             "default, gpu and lenet presets, <arch>-<preset> for the others)")
    train_parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                              help="a named set of hyperparameters; flags below override it (default: default)")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    train_parser.add_argument("--checkpoint", type=Path,
                              help="save the training state here after every epoch; a run that finds it goes on "
                                   "from there")
    hyper = train_parser.add_argument_group("hyperparameters (defaults before the preset is applied)")
    for name, (kind, description, default) in field_help().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            hyper.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{description} (default: {default})")
        else:
            hyper.add_argument(flag, dest=name, type=kind, default=None, help=f"{description} (default: {default})")
    evaluate_parser = commands.add_parser("evaluate", help="measure a stored model on labelled images")
    evaluate_parser.add_argument("model_dir", type=Path, help="a version folder, e.g. model_store/convnet/4")
    evaluate_parser.add_argument("--data", required=True, type=Path, help="labelled images (tree or CIFAR batches)")
    evaluate_parser.add_argument("--split", choices=["train", "test"], default="train",
                                 help="which CIFAR batches to read (ignored for folder trees)")
    evaluate_parser.add_argument("--plot", type=Path, help="write the confusion matrix PNG here")
    evaluate_parser.add_argument("--precision", choices=[contract.INT8, contract.FP32], default=contract.INT8,
                                 help="which graph to measure when the version has both (default: int8, as served)")
    requantize_parser = commands.add_parser(
        "requantize", help="publish a version's FP32 graphs again with a new INT8 graph and verification set")
    requantize_parser.add_argument("model_dir", type=Path, help="a version folder, e.g. model_store/convnet/7")
    requantize_parser.add_argument("--data", required=True, type=Path, help="the labelled images it was trained on")
    requantize_parser.add_argument("--extra-data", type=Path, help="the other classes' images it was trained with")
    requantize_parser.add_argument("--store", type=Path, default=Path("model_store"),
                                   help="model store to publish into (default: model_store)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            overrides = {name: getattr(args, name) for name in field_help()}
            return train_command(args, from_preset(args.preset, **overrides))
        if args.command == "requantize":
            return requantize_command(args)
        return evaluate_command(args)
    except (DataError, ParityError, FileExistsError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


SHIPPED_PRESETS = ("default", "gpu", "lenet")  # the recipes of the served models, which publish under their names


def model_name(preset: str, arch: str) -> str:
    """The store name a run publishes under: the architecture's for the shipped presets, a name of its own for any
    other preset, so a quick run can never become what serves as ``convnet``."""
    return arch if preset in SHIPPED_PRESETS else f"{arch}-{preset}"


def train_command(args: argparse.Namespace, config: TrainConfig) -> int:
    # torch and the quantizer are imported here, so --help is instant
    from training import quantize
    from training.publish import Release, publish_model, release_record
    from training.train import fit, seed_everything

    started = time.perf_counter()
    name = args.name or model_name(args.preset, config.arch)
    labels = list(PRODUCT_LABELS)
    product = data.load(args.data, tuple(labels), progress=not args.no_progress)
    train_part, val = data.split(product, config.val_fraction, config.seed)
    summary = {"root": str(args.data), "counts": product.counts(), "train_counts": train_part.counts(),
               "validation_counts": val.counts(), "split_seed": config.seed, "val_fraction": config.val_fraction}
    other_val = None
    if args.extra_data:
        # The same share of the other classes is held out: images of none of the labels, never trained on, on
        # which export measures and sets the "none of these" threshold.
        extra_train, other_val = data.split(data.load(args.extra_data, None, progress=not args.no_progress),
                                            config.val_fraction, config.seed)
        summary.update(extra_root=str(args.extra_data), other_validation_counts=other_val.counts())
        if config.extra_classes:
            train_part = data.merge(train_part, extra_train)
            summary.update(extra_counts=extra_train.counts())
    pixels = train_part.images.reshape(-1, 3).astype(np.float64) / 255.0
    height, width = train_part.images.shape[1:3]  # the size the images were decoded to
    spec = InputSpec(height=height, width=width, mean=tuple(round(float(v), 4) for v in pixels.mean(0)),
                     std=tuple(round(float(v), 4) for v in pixels.std(0)))
    del pixels
    train_inputs, val_inputs = normalize(train_part.images, spec), normalize(val.images, spec)
    print(f"training {name} ({config.arch}) on {len(train_part.labels)} images "
          f"({', '.join(train_part.label_names)}), validating on {len(val.labels)}")
    seed_everything(config.seed)  # before the model is built: initial weights depend on it
    model = build(config.arch, len(train_part.label_names), config.width, config.residual_blocks())
    final, history, run_info = fit(config, train_part, train_inputs, val, val_inputs, model, len(labels),
                                   progress=not args.no_progress, checkpoint=args.checkpoint)
    product_train = np.flatnonzero(train_part.labels < len(labels))
    chosen = np.random.default_rng(config.seed).choice(
        product_train, min(quantize.CALIBRATION_IMAGES, len(product_train)), replace=False)
    release = Release(
        name=name, labels=labels, spec=spec, val_images=val.images, val_inputs=val_inputs, val_labels=val.labels,
        other_inputs=normalize(other_val.images, spec) if other_val is not None else None,
        calibration_inputs=train_inputs[np.sort(chosen)],
        record=release_record(config, args.preset, run_info, round(time.perf_counter() - started, 1), summary,
                              (final.__doc__ or "").split("\n")[0]))
    del train_inputs
    target, metadata = publish_model(final, config.tta_flip, history.rows, release, args.store)
    figures = metadata.metrics
    int8 = figures.quantization
    print(f"published {target}: validation accuracy {figures.validation.accuracy:.2%}, "
          f"ECE {figures.calibration.before.ece:.3f} → {figures.calibration.after.ece:.3f} "
          f"(T = {figures.calibration.temperature:.3f}), "
          + (f"other classes flagged {figures.domain.other_flagged:.1%} at {figures.domain.own_flagged:.1%} of its "
             f"own, " if figures.domain.other_flagged is not None else "")
          + (f"INT8 {int8.int8.accuracy:.2%} ({int8.int8.latency_ms:.2f} vs {int8.fp32.latency_ms:.2f} ms)"
             if int8.accepted else f"INT8 refused: {'; '.join(int8.problems)}")
          + f"; training {run_info['wall_time_s']:.0f} s")
    return 0


def requantize_command(args: argparse.Namespace) -> int:
    """The validation split, other classes and calibration images exactly as the version's training run drew them
    (its recorded seed and share), then ``training.publish.requantize``."""
    from service.metadata import ModelMetadata
    from training import quantize
    from training.publish import Release, requantize

    metadata = ModelMetadata.read(args.model_dir / "metadata.json")
    spec, labels, recorded = metadata.input.preprocessing, metadata.labels, metadata.data
    seed, share = recorded["split_seed"], recorded["val_fraction"]
    train_part, val = data.split(data.load(args.data, tuple(labels), spec=spec), share, seed)
    other = None
    if args.extra_data:
        other = data.split(data.load(args.extra_data, None, spec=spec), share, seed)[1]
    chosen = np.random.default_rng(seed).choice(len(train_part.labels), min(quantize.CALIBRATION_IMAGES,
                                                                            len(train_part.labels)), replace=False)
    release = Release(name=metadata.name, labels=labels, spec=spec, val_images=val.images,
                      val_inputs=normalize(val.images, spec), val_labels=val.labels,
                      other_inputs=normalize(other.images, spec) if other is not None else None,
                      calibration_inputs=normalize(train_part.images[np.sort(chosen)], spec))
    target, published = requantize(args.model_dir, release, args.store)
    checks = published.metrics.quantization
    print(f"published {target}: " + (f"INT8 {checks.int8.accuracy:.2%} (FP32 {checks.fp32.accuracy:.2%}), "
                                     f"{checks.int8.latency_ms:.2f} vs {checks.fp32.latency_ms:.2f} ms, "
                                     f"recipe {checks.method}" if checks.accepted
                                     else f"INT8 refused: {'; '.join(checks.problems)}"))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    model = OnnxModel(args.model_dir, intra_op_threads=0, precision=args.precision)
    model.load()
    images = data.load(args.data, tuple(model.labels), spec=model.spec, cifar_split=args.split)
    inputs = normalize(images.images, model.spec)
    probabilities = np.concatenate([model.predict(inputs[start:start + 500]).probabilities
                                    for start in range(0, len(inputs), 500)])
    metrics = classification_metrics(probabilities, images.labels, model.labels)
    if args.plot:
        plot_confusion(metrics, args.plot, f"{model.name} v{model.version} ({model.precision})")
    print(json.dumps({"precision": model.precision, **{k: metrics[k] for k in ("accuracy", "count", "per_class",
                                                                                "confusion_matrix")}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
