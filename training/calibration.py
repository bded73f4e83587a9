"""Probabilities that mean what they say, and an honest "none of these", fitted on the validation split at export.

- Temperature scaling: one number T, fitted by minimising the validation log-loss of softmax(logits / T). Dividing
  all logits by the same positive number never changes which is largest, so predictions stay exactly as trained.
- The domain score: a raw score that separates images of the labels from images of other classes (the energy
  log-sum-exp of the label logits, or the softmax mass on the labels when the auxiliary classes' outputs are kept),
  mapped through a logistic curve fitted on validation images of both kinds, so that it reads as "how much this
  looks like the training images", in [0, 1]. The threshold flags at most ``target`` of the labels' own images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ECE_BINS = 15
OWN_FLAGGED_TARGET = 0.05  # at most this share of the labels' own validation images may be called out of domain


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(1)
    return peak + np.log(np.exp(logits - peak[:, None]).sum(1))


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: count, mean confidence and accuracy; and the expected calibration error."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    accuracy = np.bincount(index, weights=correct, minlength=bins) / np.maximum(counts, 1)
    ece = float((counts / len(labels) * np.abs(accuracy - mean_confidence)).sum())
    return {"edges": edges, "counts": counts, "confidence": mean_confidence, "accuracy": accuracy, "ece": ece}


def figures(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    return {"accuracy": float((probabilities.argmax(1) == labels).mean()),
            "ece": reliability(probabilities, labels)["ece"],
            "log_loss": log_loss(probabilities, labels),
            "mean_confidence": float(probabilities.max(1).mean())}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the log-loss of softmax(logits / T): golden-section search on log T (the loss is
    convex in 1/T, so one minimum), to 1e-4 relative."""
    def loss(log_t: float) -> float:
        return log_loss(softmax(logits / np.exp(log_t)), labels)

    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > 1e-4:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(np.exp((low + high) / 2))


def roc_auc(own: np.ndarray, other: np.ndarray) -> float:
    """Probability that an own image scores higher than another class's (ties count half): Mann-Whitney U."""
    scores = np.concatenate([own, other])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based ranks, ties given their average
    return float((ranks[:len(own)].sum() - len(own) * (len(own) + 1) / 2) / (len(own) * len(other)))


@dataclass(frozen=True)
class DomainRule:
    """domain_score = sigmoid(slope * raw + offset); in_domain = domain_score >= threshold."""

    score: str  # which raw score: "energy" or "label_mass"
    slope: float
    offset: float
    threshold: float

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.slope * raw + self.offset)))


RAW_SCORES = {
    "energy": "log-sum-exp of the label logits (the negative energy)",
    "label_mass": "log of the softmax mass on the labels among all trained classes (auxiliary outputs kept)",
}


def fit_logistic(own: np.ndarray, other: np.ndarray, steps: int = 500) -> tuple[float, float]:
    """P(own | raw) as sigmoid(slope * raw + offset), both kinds weighed equally; Newton's method on the
    standardised score."""
    raw = np.concatenate([own, other])
    target = np.concatenate([np.ones(len(own)), np.zeros(len(other))])
    weight = np.concatenate([np.full(len(own), 0.5 / len(own)), np.full(len(other), 0.5 / len(other))])
    centre, scale = raw.mean(), raw.std() or 1.0
    x = np.stack([(raw - centre) / scale, np.ones_like(raw)], 1)
    theta = np.zeros(2)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ theta))
        gradient = x.T @ (weight * (p - target))
        hessian = (x * (weight * p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
        delta = np.linalg.solve(hessian, gradient)
        theta -= delta
        if np.abs(delta).max() < 1e-10:
            break
    slope = theta[0] / scale
    return float(slope), float(theta[1] - slope * centre)


def choose_domain_rule(own_raw: dict[str, np.ndarray], other_raw: dict[str, np.ndarray] | None,
                       target: float = OWN_FLAGGED_TARGET) -> tuple[DomainRule, dict]:
    """Pick the raw score that best separates the labels' images from other classes' (ROC AUC on validation), map
    it to [0, 1], and set the threshold that flags at most ``target`` of the labels' own images."""
    if other_raw:
        aucs = {name: roc_auc(own_raw[name], other_raw[name]) for name in own_raw}
        name = max(aucs, key=aucs.get)
        slope, offset = fit_logistic(own_raw[name], other_raw[name])
    else:  # nothing to compare with: a standardised energy, the threshold still bounds the own images flagged
        aucs, name = {}, "energy"
        spread = own_raw[name].std() or 1.0
        slope, offset = 1.0 / spread, -float(np.quantile(own_raw[name], target)) / spread
    rule = DomainRule(name, slope, offset, threshold=0.0)
    return DomainRule(name, slope, offset, own_threshold(rule.apply(own_raw[name]), target)), aucs


def own_threshold(own_scores: np.ndarray, target: float = OWN_FLAGGED_TARGET) -> float:
    """The highest threshold that flags at most ``target`` of the labels' own images: in_domain is
    score >= threshold, so the images strictly below it are flagged."""
    return float(np.quantile(own_scores, target, method="lower"))


def domain_figures(rule: DomainRule, own_scores: np.ndarray, other_scores: np.ndarray | None,
                   aucs: dict, target: float = OWN_FLAGGED_TARGET) -> dict:
    """What the metadata records, measured on the graph's own outputs."""
    return {
        "score": f"sigmoid({rule.slope:.4g} * raw + {rule.offset:.4g}), raw = {RAW_SCORES[rule.score]}",
        "threshold": rule.threshold,
        "own_flagged": float((own_scores < rule.threshold).mean()),
        "target_own_flagged": target,
        "other_flagged": None if other_scores is None else float((other_scores < rule.threshold).mean()),
        "roc_auc": None if other_scores is None else roc_auc(own_scores, other_scores),
        "other_count": 0 if other_scores is None else int(len(other_scores)),
        "candidates": aucs,
    }


def plot_reliability(probabilities_before: np.ndarray, probabilities_after: np.ndarray, labels: np.ndarray,
                     path: Path, title: str, temperature: float) -> None:
    """Accuracy against confidence per bin, before and after calibration; the diagonal is perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for axis, probabilities, name in ((axes[0], probabilities_before, "before (T = 1)"),
                                      (axes[1], probabilities_after, f"after (T = {temperature:.3f})")):
        bins = reliability(probabilities, labels)
        centres = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        width = bins["edges"][1] - bins["edges"][0]
        shown = bins["counts"] > 0
        axis.bar(centres[shown], bins["accuracy"][shown], width=width * 0.9, color="#4c72b0", label="accuracy")
        axis.bar(centres[shown], bins["confidence"][shown] - bins["accuracy"][shown], bottom=bins["accuracy"][shown],
                 width=width * 0.9, color="#dd8452", alpha=0.5, label="gap to confidence")
        axis.plot([0, 1], [0, 1], "k--", linewidth=1)
        axis.set_title(f"{name}: ECE {bins['ece']:.3f}")
        axis.set_xlabel("confidence (top-1 probability)")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
