"""Validation metrics and plots, computed from the exported ONNX model: what ships is what is measured."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    predicted = probabilities.argmax(1)
    count = len(label_names)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {
        name: {
            "accuracy": float(confusion[i, i] / max(1, confusion[i].sum())),  # recall
            "precision": float(confusion[i, i] / max(1, confusion[:, i].sum())),
            "support": int(confusion[i].sum()),
        }
        for i, name in enumerate(label_names)
    }
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "accuracy": float((predicted == labels).mean()),
        "loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
        "count": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": {"labels": label_names, "rows_true_columns_predicted": confusion.tolist()},
    }


def plot_confusion(metrics: dict, path: Path, title: str) -> None:
    labels = metrics["confusion_matrix"]["labels"]
    matrix = np.array(metrics["confusion_matrix"]["rows_true_columns_predicted"])
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=120)
    ax.imshow(matrix / matrix.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            share = matrix[i, j] / max(1, matrix[i].sum())
            ax.text(j, i, f"{matrix[i, j]}\n{share:.1%}", ha="center", va="center", fontsize=8,
                    color="white" if share > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: {metrics['accuracy']:.2%} of {metrics['count']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train (augmented, smoothed)")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    acc_ax.plot(epochs, [r["train_accuracy"] for r in history], label="train (augmented)")
    acc_ax.plot(epochs, [r["val_accuracy"] for r in history], label="validation")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    focus_start = next((row["epoch"] for row in history if row.get("focus")), None)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if focus_start is not None:
            ax.axvline(focus_start - 0.5, color="grey", linestyle=":", label="product labels only from here")
    acc_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
