"""Verified where it serves: a graph's answers on this machine's CPU, compared with what export measured.

Before a version serves, the graph it will serve runs the version's verification set on this machine.

Export writes ``verification.npz`` beside the graphs: a few hundred validation images (uint8, stratified, labels
interleaved so that every prefix of a multiple of the label count is stratified too), their labels, the FP32 graph's
answers (the reference) and, when the version has an INT8 graph, that graph's answers as export saw them. The service
runs the first VERIFY_IMAGES of them through the graph it is about to serve and measures top-1 agreement with the
reference, accuracy, in-domain agreement, the share of the labels' own images flagged "none of these" and the largest
probability difference; each must stay within its tolerance of the figure the exported answers give for the same
images. Why: integer kernels differ between CPUs (without VNNI, ONNX Runtime's U8S8 kernels add pairs of 8-bit
products in saturating 16-bit lanes), so a figure checked on the exporting machine can be wrong on this one.
"""

from __future__ import annotations

import functools
import io
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service import contract

# CPU flags (as /proc/cpuinfo spells them) that decide which integer kernels ONNX Runtime picks.
CPU_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
REFERENCE = contract.FP32  # the precision whose answers are the reference


@functools.cache
def cpu() -> dict:
    """This machine's processor and the instruction-set features that matter for inference, with the ONNX Runtime
    version: what every verification figure says it was measured on."""
    import onnxruntime

    flags, name = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and name in ("", platform.machine()):
                name = value.strip()
    except OSError:  # not Linux: the features stay unknown, and say so
        pass
    return {"processor": name, "machine": platform.machine(),
            "features": {feature: feature in flags for feature in CPU_FEATURES} if flags else None,
            "onnxruntime": onnxruntime.__version__}


@dataclass(frozen=True)
class Tolerances:
    """How far this machine's figures may fall from the exported ones (VERIFY_* settings)."""

    images: int = 256
    max_accuracy_drop: float = 0.005
    max_agreement_drop: float = 0.005
    max_flagged_rise: float = 0.005
    max_probability_difference: float = 0.02

    @classmethod
    def of(cls, settings) -> Tolerances:
        return cls(settings.VERIFY_IMAGES, settings.VERIFY_MAX_ACCURACY_DROP, settings.VERIFY_MAX_AGREEMENT_DROP,
                   settings.VERIFY_MAX_FLAGGED_RISE, settings.VERIFY_MAX_PROBABILITY_DIFFERENCE)


@dataclass(frozen=True)
class Answers:
    probabilities: np.ndarray  # float32 (N, labels)
    domain_score: np.ndarray  # float32 (N,)
    in_domain: np.ndarray  # bool (N,)

    def head(self, count: int) -> Answers:
        return Answers(self.probabilities[:count], self.domain_score[:count], self.in_domain[:count])


@dataclass(frozen=True)
class VerificationSet:
    images: np.ndarray  # uint8 (N, H, W, 3), as decoded by service.preprocessing
    labels: np.ndarray  # int64 (N,)
    answers: dict[str, Answers]  # precision → that graph's answers at export ("fp32" always)

    @classmethod
    def read(cls, data: bytes) -> VerificationSet:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            precisions = sorted({key.split("_", 1)[0] for key in arrays.files if key.endswith("_probabilities")})
            answers = {p: Answers(arrays[f"{p}_probabilities"], arrays[f"{p}_domain_score"],
                                  arrays[f"{p}_in_domain"].astype(bool)) for p in precisions}
            set_ = cls(arrays["images"], arrays["labels"].astype(np.int64), answers)
        if REFERENCE not in set_.answers:
            raise ValueError("verification.npz has no FP32 reference answers (fp32_probabilities, ...)")
        return set_

    def write(self, path: Path) -> None:
        arrays = {"images": self.images.astype(np.uint8), "labels": self.labels.astype(np.int64)}
        for precision, answers in self.answers.items():
            arrays.update({f"{precision}_probabilities": answers.probabilities.astype(np.float32),
                           f"{precision}_domain_score": answers.domain_score.astype(np.float32),
                           f"{precision}_in_domain": answers.in_domain.astype(bool)})
        with path.open("wb") as handle:
            np.savez_compressed(handle, **arrays)


def choose(labels: np.ndarray, label_count: int, per_label: int, seed: int = 0) -> np.ndarray:
    """Indexes of ``per_label`` images of each label, interleaved (label 0, 1, …, 0, 1, …) so that every prefix of
    a multiple of ``label_count`` is stratified."""
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.permutation(np.flatnonzero(labels == label))[:per_label]) for label in range(label_count)]
    per_label = min(len(part) for part in chosen)
    return np.stack([part[:per_label] for part in chosen], axis=1).reshape(-1)


def figures(answers: Answers, reference: Answers, labels: np.ndarray) -> dict:
    """What a graph's answers give on the set, against the FP32 reference answers."""
    predicted = answers.probabilities.argmax(1)
    return {"accuracy": float((predicted == labels).mean()),
            "top1_agreement": float((predicted == reference.probabilities.argmax(1)).mean()),
            "in_domain_agreement": float((answers.in_domain == reference.in_domain).mean()),
            "own_flagged": float((~answers.in_domain).mean()),
            "max_probability_difference": float(np.abs(answers.probabilities - reference.probabilities).max())}


@dataclass(frozen=True)
class Verification:
    """One graph's check on this machine: passed, or the problems that refuse it."""

    precision: str
    passed: bool
    images: int
    measured: dict
    exported: dict
    problems: list[str]
    seconds: float

    def describe(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3), "on": cpu()}

    def summary(self) -> str:
        return "; ".join(self.problems) if self.problems else "passed"


def problems_of(measured: dict, exported: dict, tolerances: Tolerances) -> list[str]:
    """Each figure that moved beyond its tolerance, in words an operator can act on."""
    problems = []
    for key, words in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement with FP32"),
                       ("in_domain_agreement", "in-domain agreement with FP32")):
        limit = tolerances.max_accuracy_drop if key == "accuracy" else tolerances.max_agreement_drop
        if round(exported[key] - measured[key], 9) > limit:
            problems.append(f"{words} {measured[key]:.2%} here vs {exported[key]:.2%} at export (at most "
                            f"{limit:.1%} lower)")
    if round(measured["own_flagged"] - exported["own_flagged"], 9) > tolerances.max_flagged_rise:
        problems.append(f"flags {measured['own_flagged']:.2%} of the labels' own images as none of these, vs "
                        f"{exported['own_flagged']:.2%} at export (at most {tolerances.max_flagged_rise:.1%} more)")
    difference = measured["max_probability_difference"] - exported["max_probability_difference"]
    if difference > tolerances.max_probability_difference:
        problems.append(f"a probability differs from FP32's by {measured['max_probability_difference']:.3f} here vs "
                        f"{exported['max_probability_difference']:.3f} at export (at most "
                        f"{tolerances.max_probability_difference:g} more)")
    return problems


def verify(precision: str, run: Callable[[np.ndarray], Answers], normalize: Callable[[np.ndarray], np.ndarray],
           verification_set: VerificationSet, tolerances: Tolerances, batch_size: int = 64) -> Verification:
    """Run the set's first ``tolerances.images`` images through ``run`` (the graph about to serve) and compare."""
    started = time.perf_counter()
    count = min(tolerances.images, len(verification_set.labels))
    images, labels = verification_set.images[:count], verification_set.labels[:count]
    parts = [run(normalize(images[start:start + batch_size])) for start in range(0, count, batch_size)]
    answers = Answers(*(np.concatenate([getattr(part, name) for part in parts])
                        for name in contract.OUTPUT_NAMES))
    reference = verification_set.answers[REFERENCE].head(count)
    measured = figures(answers, reference, labels)
    if precision in verification_set.answers:
        exported = figures(verification_set.answers[precision].head(count), reference, labels)
        problems = problems_of(measured, exported, tolerances)
    else:  # nothing to hold this graph to: it is not served unverified
        exported = figures(reference, reference, labels)
        problems = [f"verification.npz has no answers of the {precision} graph from export to compare with"]
    return Verification(precision, not problems, count, measured, exported, problems, time.perf_counter() - started)
