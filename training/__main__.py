"""Command line: ``python -m training train ...`` and ``python -m training evaluate ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.preprocessing import InputSpec, normalize
from training import data
from training.config import PRESETS, TrainConfig, field_help, from_preset
from training.data import PRODUCT_LABELS, DataError
from training.evaluate import StoredModel, classification_metrics, onnx_probabilities, plot_confusion, plot_curves
from training.export import (
    ParityError,
    discard,
    environment,
    inspection_outputs,
    next_version,
    publish,
    sha256_of,
    staging_folder,
    utc_now,
    write_graphs,
    write_json,
)
from training.models import build, keep_first_classes, parameter_count

DESCRIPTION = """\
Train the four-class ConvNet (dog, cat, boat, bird), evaluate it, and publish it to the model store.

  python -m training train --data ../shared/data/cifar4/train                  # the accurate default, 'convnet'
  python -m training train --data DATA --preset fast                          # a few minutes, for iteration
  python -m training train --data DATA --preset lenet                         # the classic LeNet layout
  python -m training train --data DATA --epochs 40 --lr 0.1                   # override any hyperparameter
  python -m training evaluate model_store/convnet/4 --data cifar-10-batches-py --split test

DATA is a folder with one sub-folder per label (dog/ cat/ boat/ bird/ of images), or CIFAR-10's python
batches (cifar-10-batches-py; 'ship' is used as 'boat'). Each run writes the next version,
model_store/<name>/<version>/, with model.onnx, inspect.onnx, metadata.json, metrics.json and plots. <name> is the
architecture's (convnet, lenet) for the default and lenet presets, and <arch>-<preset> for the others (a fast run
publishes convnet-fast/<n>, never a version of the convnet that serves); --name chooses another.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate}")
    train_parser = commands.add_parser("train", help="train, evaluate, export and publish a model")
    train_parser.add_argument("--data", required=True, type=Path, help="labelled images (folder tree or CIFAR batches)")
    train_parser.add_argument("--extra-data", type=Path, help="images of other classes, learned as auxiliary outputs")
    train_parser.add_argument("--store", type=Path, default=Path("model_store"),
                              help="model store to publish into (default: model_store)")
    train_parser.add_argument("--name", help="model name in the store (default: the architecture's name for the "
                                             "default and lenet presets, <arch>-<preset> for the others)")
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
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            overrides = {name: getattr(args, name) for name in field_help()}
            return train_command(args, from_preset(args.preset, **overrides))
        return evaluate_command(args)
    except (DataError, ParityError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def model_name(preset: str, arch: str) -> str:
    """The store name a run publishes under: the architecture's for the default and lenet presets, a name of its
    own for any other preset, so a quick run can never become what serves as ``convnet``."""
    return arch if preset in ("default", arch) else f"{arch}-{preset}"


def train_command(args: argparse.Namespace, config: TrainConfig) -> int:
    from training.train import fit, seed_everything  # torch import deferred so --help is instant

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
    spec = InputSpec(height=32, width=32, mean=tuple(round(float(v), 4) for v in pixels.mean(0)),
                     std=tuple(round(float(v), 4) for v in pixels.std(0)))
    del pixels
    train_inputs, val_inputs = normalize(train_part.images, spec), normalize(val.images, spec)
    print(f"training {name} ({config.arch}) on {len(train_part.labels)} images "
          f"({', '.join(train_part.label_names)}), validating on {len(val.labels)}")
    seed_everything(config.seed)  # before the model is built: initial weights depend on it
    model = build(config.arch, len(train_part.label_names), config.width, config.residual_blocks())
    final, history, run_info = fit(config, train_part, train_inputs, val, val_inputs, model, len(labels),
                                   progress=not args.no_progress, checkpoint=args.checkpoint)
    keep_first_classes(final, len(labels))
    version = next_version(args.store, name)
    staging = staging_folder(args.store, name)
    try:
        properties = {"labels": json.dumps(labels), "name": name, "version": str(version)}
        parity = write_graphs(final, staging, config.tta_flip, val_inputs[:256], properties)
        session = ort.InferenceSession(str(staging / "model.onnx"), providers=["CPUExecutionProvider"])
        metrics = classification_metrics(onnx_probabilities(session, val_inputs), val.labels, labels)  # as shipped
        plot_confusion(metrics, staging / "confusion_matrix.png", f"{name} v{version} validation")
        plot_curves(history.rows, staging / "training_curves.png", f"{name} v{version}")
        write_json(staging / "metrics.json", {"validation": metrics, "history": history.rows})
        metadata = {
            "name": name,
            "version": str(version),
            "created_at": utc_now(),
            "labels": labels,
            "input": {"name": "input", "dtype": "float32", "shape": [-1, 3, spec.height, spec.width],
                      "preprocessing": spec.to_metadata()},
            "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, len(labels)]},
                        {"name": "logits", "dtype": "float32", "shape": [-1, len(labels)]}],
            "files": {"model": "model.onnx", "inspect": "inspect.onnx"},
            "sha256": sha256_of(staging / "model.onnx"),
            "inspect_sha256": sha256_of(staging / "inspect.onnx"),
            "inspection": {"stages": inspection_outputs(final, (3, spec.height, spec.width)),
                           "class_maps": "class_maps" if final.cam_stage else None,
                           "cam_stage": final.cam_stage,
                           "first_conv": next(s["name"] for s in inspection_outputs(final, (3, 32, 32))
                                              if s["kind"] == "conv")},
            "architecture": {"name": config.arch, "parameters": parameter_count(final),
                             "tta_flip": config.tta_flip, "description": (final.__doc__ or "").split("\n")[0]},
            "training": {"config": config.to_dict(), "preset": args.preset, **run_info,
                         "total_wall_time_s": round(time.perf_counter() - started, 1), **environment()},
            "data": summary,
            "metrics": {"validation": {k: metrics[k] for k in ("accuracy", "loss", "count", "per_class")},
                        "confusion_matrix": metrics["confusion_matrix"]},
            "parity": parity,
        }
        write_json(staging / "metadata.json", metadata)
        target = publish(staging, args.store, name, version)
    except BaseException:
        discard(staging)
        raise
    print(f"published {target}: validation accuracy {metrics['accuracy']:.2%}, "
          f"training {run_info['wall_time_s']:.0f} s, parity max |diff| "
          f"{max(p['max_abs_diff'] for p in parity.values()):.1e}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    stored = StoredModel(args.model_dir)
    images = data.load(args.data, tuple(stored.labels), spec=stored.spec, cifar_split=args.split)
    metrics = classification_metrics(stored.probabilities(normalize(images.images, stored.spec)), images.labels,
                                     stored.labels)
    if args.plot:
        plot_confusion(metrics, args.plot, f"{stored.metadata['name']} v{stored.metadata['version']}")
    print(json.dumps({k: metrics[k] for k in ("accuracy", "count", "per_class", "confusion_matrix")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
