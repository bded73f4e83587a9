"""Static INT8 quantization of the classify graph with ONNX Runtime, and the checks that decide if it ships.

QDQ format, per-channel weights, activations calibrated on training images (never validation ones). Every recipe in
``RECIPES`` is tried and measured on this machine, and the fastest whose graph passes every check ships. A graph
passes only when top-1 agrees with FP32 on nearly every validation image, accuracy, overall and per label, stays within
the tolerances below, it is faster than FP32 (a small net can lose more to quantizing and dequantizing than it
gains), and it is **saturation-free**: ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI (AVX2 only: older Xeons,
AMD EPYC before Zen 4) add each pair of uint8 x int8 products in a saturating 16-bit lane (VPMADDUBSW), so a graph
with full-range 8-bit weights (|w| up to 127: 2 x 255 x 127 = 64,770 > 32,767) computes other numbers there than on
the machine that checked it. With weights within 7 bits (``reduce_range``: |w| <= 64, 2 x 255 x 64 = 32,640) or
uint8 weights (widened to 16 bits before they are multiplied), every kernel computes the same integers, so what is
measured here holds on every x86 CPU; the service re-checks it where it serves anyway (service/verification.py).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from service import contract

CALIBRATION_IMAGES = 512
MIN_TOP1_AGREEMENT = 0.99  # share of validation images on which INT8 and FP32 pick the same label
MAX_ACCURACY_DROP = 0.003  # 0.3 points
MAX_LABEL_ACCURACY_DROP = 0.01  # 1 point on any one label
# The compute: convolutions and the linear head. Softmax, the flip average and the domain score stay FP32 (cheap,
# and where rounding would move probabilities most).
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


class _Batches(CalibrationDataReader):
    def __init__(self, inputs: np.ndarray, batch_size: int = 64):
        self.batches = iter([{contract.INPUT: inputs[i:i + batch_size]} for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


@dataclass(frozen=True)
class Recipe:
    """One way to quantize; export measures each and ships the fastest whose graph passes every check."""

    name: str
    reduce_range: bool = False  # 7-bit weights: no 16-bit lane can saturate (see the module docstring)
    uint8_weights: bool = False  # U8U8: the kernels widen both sides to 16 bits first, also exact everywhere
    keep_ends_fp32: bool = False  # the first convolution (raw pixels) and the classifier head stay FP32
    percentile: float | None = None  # activation ranges from this percentile instead of min-max

    def describe(self) -> str:
        ranges = f"{self.percentile} % percentile" if self.percentile else "min-max"
        weights = "UINT8" if self.uint8_weights else "7-bit INT8 (reduce_range)" if self.reduce_range else "INT8"
        ends = ", first convolution and head kept FP32" if self.keep_ends_fp32 else ""
        return (f"ONNX Runtime static quantization: QDQ, per-channel {weights} weights, UINT8 activations ({ranges} "
                f"on training images), ops {', '.join(QUANTIZED_OPS)}{ends}")


# Measured on convnet v6's FP32 graph (README, "INT8 on every CPU"); full-range "minmax" is kept to show what it
# costs, and is refused by the saturation check.
RECIPES = (Recipe("minmax-7bit", reduce_range=True), Recipe("minmax-u8u8", uint8_weights=True),
           Recipe("minmax-7bit-fp32-ends", reduce_range=True, keep_ends_fp32=True),
           Recipe("percentile-7bit-fp32-ends", reduce_range=True, keep_ends_fp32=True, percentile=99.999),
           Recipe("minmax"))
SATURATION_FREE_INT8_WEIGHT = 64  # 2 x 255 x 64 = 32,640 fits a signed 16-bit lane


def _end_nodes(path: Path) -> list[str]:
    import onnx

    nodes = [node for node in onnx.load(str(path)).graph.node if node.op_type in QUANTIZED_OPS]
    return [nodes[0].name, nodes[-1].name] if nodes else []


def quantize(fp32_path: Path, int8_path: Path, calibration_inputs: np.ndarray, recipe: Recipe = RECIPES[0]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        options = {"calibrate_method": CalibrationMethod.Percentile,
                   "extra_options": {"CalibPercentile": recipe.percentile}} if recipe.percentile else {}
        quantize_static(str(prepared), str(int8_path), _Batches(calibration_inputs), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, reduce_range=recipe.reduce_range,
                        weight_type=QuantType.QUInt8 if recipe.uint8_weights else QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=_end_nodes(prepared) if recipe.keep_ends_fp32 else None, **options)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probabilities(path: Path, inputs: np.ndarray, batch_size: int = 500) -> np.ndarray:
    run = session(path, threads=0)
    return np.concatenate([run.run([contract.PROBABILITIES], {contract.INPUT: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


def latency_ms(path: Path, image: np.ndarray, repeats: int = 200) -> float:
    """Median time of one image on one thread, after warm-up."""
    run = session(path, threads=1)
    feed = {contract.INPUT: image[None]}
    for _ in range(20):
        run.run([contract.PROBABILITIES], feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run.run([contract.PROBABILITIES], feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def precision_figures(path: Path, inputs: np.ndarray, labels: np.ndarray, label_names: list[str]) -> tuple[dict,
                                                                                                          np.ndarray]:
    predicted = probabilities(path, inputs).argmax(1)
    per_class = {name: float((predicted[labels == i] == i).mean()) for i, name in enumerate(label_names)}
    return {"accuracy": float((predicted == labels).mean()), "per_class_accuracy": per_class,
            "latency_ms": round(latency_ms(path, inputs[0]), 4), "size_bytes": path.stat().st_size}, predicted


def check(fp32: dict, fp32_predicted: np.ndarray, int8: dict, int8_predicted: np.ndarray,
          label_names: list[str]) -> tuple[float, list[str]]:
    """Top-1 agreement with FP32, and what keeps the INT8 graph from shipping (nothing, when it may)."""
    agreement = float((fp32_predicted == int8_predicted).mean())
    problems = []
    if agreement < MIN_TOP1_AGREEMENT:
        problems.append(f"top-1 agrees with FP32 on {agreement:.2%} of validation images (needs "
                        f"{MIN_TOP1_AGREEMENT:.0%})")
    if round(fp32["accuracy"] - int8["accuracy"], 9) > MAX_ACCURACY_DROP:
        problems.append(f"accuracy {int8['accuracy']:.2%} vs FP32 {fp32['accuracy']:.2%} (at most "
                        f"{MAX_ACCURACY_DROP:.1%} lower)")
    for name in label_names:
        drop = fp32["per_class_accuracy"][name] - int8["per_class_accuracy"][name]
        if round(drop, 9) > MAX_LABEL_ACCURACY_DROP:
            problems.append(f"{name} accuracy {drop:.2%} below FP32 (at most {MAX_LABEL_ACCURACY_DROP:.0%})")
    return agreement, problems


def saturation_problem(int8_path: Path) -> str | None:
    """Why the graph may compute other numbers on CPUs without VNNI (None when it cannot): an int8 weight tensor
    with values beyond 7 bits."""
    import onnx
    from onnx import numpy_helper

    worst = {}
    for initializer in onnx.load(str(int8_path)).graph.initializer:
        if initializer.data_type == onnx.TensorProto.INT8 and len(initializer.dims) >= 2:
            worst[initializer.name] = int(np.abs(numpy_helper.to_array(initializer).astype(np.int32)).max())
    over = {name: value for name, value in worst.items() if value > SATURATION_FREE_INT8_WEIGHT}
    if not over:
        return None
    return (f"{len(over)} of {len(worst)} int8 weight tensors use more than 7 bits (|w| up to {max(over.values())}): "
            "pairs of products can saturate 16-bit lanes on CPUs without VNNI (AVX2 only)")


def quantize_and_check(fp32_path: Path, int8_path: Path, calibration_inputs: np.ndarray, val_inputs: np.ndarray,
                       val_labels: np.ndarray, label_names: list[str], progress=print) -> dict:
    """Measure every recipe on this machine and write ``int8_path`` with the fastest whose graph passes the checks
    against FP32 on validation; when none does, the file is removed and the figures say why."""
    from service.verification import cpu

    fp32, fp32_predicted = precision_figures(fp32_path, val_inputs, val_labels, label_names)
    tried, passing = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in RECIPES:
            candidate = Path(scratch) / f"model.int8.{recipe.name}.onnx"
            try:
                quantize(fp32_path, candidate, calibration_inputs, recipe)
            except Exception as exc:  # ONNX Runtime's calibrators can fail on degenerate activations (tiny nets)
                tried.append(f"{recipe.name}: quantization failed: {str(exc)[:200]}")
                continue
            int8, int8_predicted = precision_figures(candidate, val_inputs, val_labels, label_names)
            agreement, problems = check(fp32, fp32_predicted, int8, int8_predicted, label_names)
            if int8["latency_ms"] >= fp32["latency_ms"]:  # a small net can lose more to (de)quantizing
                problems.append(f"not faster than FP32 ({int8['latency_ms']:.3f} vs {fp32['latency_ms']:.3f} ms "
                                "per image)")
            saturation = saturation_problem(candidate)
            problems += [saturation] if saturation else []
            tried.append(f"{recipe.name}: {int8['accuracy']:.2%}, top-1 agreement {agreement:.2%}, "
                         f"{int8['latency_ms']:.3f} ms: " + ("passed" if not problems else "; ".join(problems)))
            progress(f"  INT8 recipe {tried[-1]}")
            attempt = (recipe, int8, agreement, problems, candidate)
            if not problems:
                passing.append(attempt)
            last = attempt
        chosen = min(passing, key=lambda attempt: attempt[1]["latency_ms"]) if passing else None
        if chosen is not None:
            shutil.copyfile(chosen[4], int8_path)
        else:
            int8_path.unlink(missing_ok=True)
    if not tried or all("quantization failed" in line for line in tried):  # nothing to compare, nothing ships
        recipe, int8, agreement, problems = RECIPES[-1], {**fp32, "latency_ms": None}, 0.0, ["no recipe produced a "
                                                                                           "graph"]
    else:
        recipe, int8, agreement, problems, _ = chosen or last
    return {"accepted": chosen is not None, "method": recipe.describe(), "recipes_tried": tried,
            "calibration_images": int(len(calibration_inputs)), "top1_agreement": agreement,
            contract.FP32: fp32, contract.INT8: int8, "problems": problems, "checked_on": cpu(),
            "saturation_free": chosen is not None}
