"""Labelled images from disk → uint8 arrays, and the stratified validation split.

Two layouts are read:
- a class-per-folder tree: ``<root>/<label>/*.jpg|png|...``;
- CIFAR-10's python batches (``cifar-10-batches-py``), where ``ship`` is named ``boat``.
Images are decoded with the service's own preprocessing, so training sees exactly what the service will.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.errors import ServiceError
from service.preprocessing import IMAGE_SUFFIXES, InputSpec, decode

# The product's classes, in output order. The service reads them back from metadata.json.
PRODUCT_LABELS = ("dog", "cat", "boat", "bird")
CIFAR_RENAMES = {"ship": "boat"}
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_BATCHES = ["test_batch"]


class DataError(Exception):
    """The data root is unusable; the message names the file or folder and what to do."""


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8 (N, H, W, 3), RGB
    labels: np.ndarray  # int64 (N,), indexes into label_names
    label_names: list[str]

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.label_names)}

    def subset(self, index: np.ndarray) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index], self.label_names)


def decoding_spec(height: int = 32, width: int = 32) -> InputSpec:
    """The geometry part of the input spec; normalisation statistics are computed later from the training split."""
    return InputSpec(height=height, width=width, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def load(root: str | Path, labels: tuple[str, ...] | None = PRODUCT_LABELS, spec: InputSpec | None = None,
         progress: bool = True, cifar_split: str = "train") -> LabelledImages:
    """Read a folder tree or CIFAR-10 batches. ``labels=None`` takes every class found (for auxiliary data)."""
    root = Path(root)
    spec = spec or decoding_spec()
    if not root.exists():
        raise DataError(f"Data root {root} does not exist. Pass --data with a class-per-folder tree or "
                        "the cifar-10-batches-py folder (README: 'Getting the data').")
    if not root.is_dir():
        raise DataError(f"Data root {root} is a file, not a folder.")
    cifar_dir = _find_cifar_batches(root)
    if cifar_dir is not None:
        batches = CIFAR_TEST_BATCHES if cifar_split == "test" else CIFAR_TRAIN_BATCHES
        return _load_cifar(cifar_dir, labels, spec, batches)
    return _load_tree(root, labels, spec, progress)


def split(data: LabelledImages, val_fraction: float, seed: int,
          val_labels: int | None = None) -> tuple[LabelledImages, LabelledImages]:
    """Stratified split: ``val_fraction`` of each of the first ``val_labels`` labels goes to validation."""
    rng = np.random.default_rng(seed)
    val_labels = len(data.label_names) if val_labels is None else val_labels
    val_index = []
    for label in range(val_labels):
        members = np.flatnonzero(data.labels == label)
        take = int(round(len(members) * val_fraction))
        val_index.append(rng.permutation(members)[:take])
    val_index = np.sort(np.concatenate(val_index)) if val_index else np.array([], dtype=np.int64)
    train_mask = np.ones(len(data.labels), dtype=bool)
    train_mask[val_index] = False
    return data.subset(np.flatnonzero(train_mask)), data.subset(val_index)


def merge(main: LabelledImages, extra: LabelledImages) -> LabelledImages:
    """Append auxiliary classes after the main ones (their label indexes are shifted past the main labels)."""
    overlap = set(main.label_names) & set(extra.label_names)
    if overlap:
        raise DataError(f"The extra data repeats labels of the main data: {sorted(overlap)}.")
    return LabelledImages(
        np.concatenate([main.images, extra.images]),
        np.concatenate([main.labels, extra.labels + len(main.label_names)]),
        main.label_names + extra.label_names,
    )


def _find_cifar_batches(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "batches.meta").is_file():
            return candidate
    return None


def _load_tree(root: Path, labels: tuple[str, ...] | None, spec: InputSpec, progress: bool) -> LabelledImages:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"Data root {root} has no label folders; expected {root}/<label>/*.jpg.")
    if labels is None:
        labels = tuple(folders)
    unknown = [f for f in folders if f not in labels]
    if unknown:
        raise DataError(f"Unknown label folder {root / unknown[0]}: expected only {', '.join(labels)}. "
                        "Move it out of the data root.")
    files: list[tuple[Path, int]] = []
    for index, label in enumerate(labels):
        folder = root / label
        if not folder.is_dir():
            raise DataError(f"Missing label folder {folder}: every label ({', '.join(labels)}) needs one.")
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if not entries:
            raise DataError(f"Label folder {folder} is empty: add at least one image.")
        for path in entries:
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path} is not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))}). "
                                "Remove it from the data root.")
            files.append((path, index))
    images = np.empty((len(files), spec.height, spec.width, 3), dtype=np.uint8)
    bar_off = None if progress else True  # None: a bar only when stderr is a terminal
    for i, (path, _) in enumerate(tqdm(files, desc=f"reading {root.name}", unit="img", disable=bar_off,
                                       mininterval=1.0)):
        try:
            images[i] = decode(path.read_bytes(), spec)
        except ServiceError as exc:
            raise DataError(f"{path} could not be read as an image: {exc.message}") from exc
    return LabelledImages(images, np.array([label for _, label in files], dtype=np.int64), list(labels))


def _load_cifar(folder: Path, labels: tuple[str, ...] | None, spec: InputSpec,
                batch_names: list[str]) -> LabelledImages:
    if (spec.height, spec.width) != (32, 32):
        raise DataError("CIFAR-10 batches are 32x32; they cannot feed a model with a different input size.")
    meta = _unpickle(folder / "batches.meta")
    names = [CIFAR_RENAMES.get(n, n) for n in _text_list(meta, "label_names")]
    if labels is None:
        labels = tuple(n for n in names if n not in PRODUCT_LABELS)
    missing = [label for label in labels if label not in names]
    if missing:
        raise DataError(f"{folder / 'batches.meta'} has no label {missing[0]!r}; it has {', '.join(names)}.")
    wanted = {names.index(label): i for i, label in enumerate(labels)}
    batch_images, batch_labels = [], []
    for batch_name in batch_names:
        path = folder / batch_name
        if not path.is_file():
            raise DataError(f"Missing CIFAR batch {path}: expected {', '.join(batch_names)} there.")
        batch = _unpickle(path)
        try:
            raw = np.asarray(batch[b"data"] if b"data" in batch else batch["data"], dtype=np.uint8)
            cifar_labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
            rows = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{path} is not a CIFAR-10 batch (expected 'data' N x 3072 and 'labels').") from exc
        keep = np.isin(cifar_labels, list(wanted))
        batch_images.append(rows[keep])
        batch_labels.append(np.array([wanted[c] for c in cifar_labels[keep]], dtype=np.int64))
    return LabelledImages(np.ascontiguousarray(np.concatenate(batch_images)), np.concatenate(batch_labels),
                          list(labels))


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({exc}).") from exc


def _text_list(meta: dict, key: str) -> list[str]:
    values = meta.get(key.encode(), meta.get(key))
    if values is None:
        raise DataError(f"batches.meta has no {key!r} entry.")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
