"""Static INT8 quantization of the classify graph with ONNX Runtime, and the checks that decide if it ships.

QDQ format, per-channel weights, activations calibrated on training images (never validation ones); a few recipes are
tried in order (``RECIPES``) and the first whose graph passes the checks ships. An INT8 graph passes only when top-1
agrees with FP32 on nearly every validation image and accuracy, overall and per label, stays within the tolerances
below, and when it is not faster than FP32 after all (a small net can lose more to quantizing and dequantizing than
it gains); either way both graphs' figures go into the metadata.
"""

from __future__ import annotations

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

CALIBRATION_IMAGES = 512
MIN_TOP1_AGREEMENT = 0.99  # share of validation images on which INT8 and FP32 pick the same label
MAX_ACCURACY_DROP = 0.003  # 0.3 points
MAX_LABEL_ACCURACY_DROP = 0.01  # 1 point on any one label
# The compute: convolutions and the linear head. Softmax, the flip average and the domain score stay FP32 (cheap,
# and where rounding would move probabilities most).
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


class _Batches(CalibrationDataReader):
    def __init__(self, inputs: np.ndarray, batch_size: int = 64):
        self.batches = iter([{"input": inputs[i:i + batch_size]} for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


@dataclass(frozen=True)
class Recipe:
    """One way to quantize; export tries them in order and ships the first whose graph passes every check."""

    name: str
    keep_ends_fp32: bool = False  # the first convolution (raw pixels) and the classifier head stay FP32
    percentile: float | None = None  # activation ranges from this percentile instead of min-max

    def describe(self) -> str:
        ranges = f"{self.percentile} % percentile" if self.percentile else "min-max"
        ends = ", first convolution and head kept FP32" if self.keep_ends_fp32 else ""
        return (f"ONNX Runtime static quantization: QDQ, per-channel INT8 weights, UINT8 activations ({ranges} on "
                f"training images), ops {', '.join(QUANTIZED_OPS)}{ends}")


RECIPES = (Recipe("minmax"), Recipe("minmax-fp32-ends", keep_ends_fp32=True),
           Recipe("percentile-fp32-ends", keep_ends_fp32=True, percentile=99.999))


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
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=_end_nodes(prepared) if recipe.keep_ends_fp32 else None, **options)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probabilities(path: Path, inputs: np.ndarray, batch_size: int = 500) -> np.ndarray:
    run = session(path, threads=0)
    return np.concatenate([run.run(["probabilities"], {"input": inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


def latency_ms(path: Path, image: np.ndarray, repeats: int = 200) -> float:
    """Median time of one image on one thread, after warm-up."""
    run = session(path, threads=1)
    feed = {"input": image[None]}
    for _ in range(20):
        run.run(["probabilities"], feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run.run(["probabilities"], feed)
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


def quantize_and_check(fp32_path: Path, int8_path: Path, calibration_inputs: np.ndarray, val_inputs: np.ndarray,
                       val_labels: np.ndarray, label_names: list[str]) -> dict:
    """Write ``int8_path`` with the first recipe whose graph passes the checks against FP32 on validation; when none
    does, the file is removed and the last attempt's figures say why."""
    fp32, fp32_predicted = precision_figures(fp32_path, val_inputs, val_labels, label_names)
    tried, int8, agreement = [], None, 0.0
    for recipe in RECIPES:
        try:
            quantize(fp32_path, int8_path, calibration_inputs, recipe)
        except Exception as exc:  # ONNX Runtime's calibrators can fail on degenerate activations (tiny test nets)
            problems = [f"quantization failed: {str(exc)[:200]}"]
            tried.append(f"{recipe.name}: {problems[0]}")
            continue
        int8, int8_predicted = precision_figures(int8_path, val_inputs, val_labels, label_names)
        agreement, problems = check(fp32, fp32_predicted, int8, int8_predicted, label_names)
        tried.append(f"{recipe.name}: " + ("passed" if not problems else "; ".join(problems)))
        if not problems:
            break
    if int8 is None:  # no recipe produced a graph: nothing to compare, and nothing ships
        int8 = {**fp32, "latency_ms": None}
    if not problems and int8["latency_ms"] >= fp32["latency_ms"]:  # a small net can lose more to (de)quantizing
        problems = [f"INT8 is not faster than FP32 ({int8['latency_ms']:.3f} vs {fp32['latency_ms']:.3f} ms per "
                    "image): FP32 serves"]
    if problems:
        int8_path.unlink(missing_ok=True)
    return {"accepted": not problems, "method": recipe.describe(), "recipes_tried": tried,
            "calibration_images": int(len(calibration_inputs)), "top1_agreement": agreement,
            "fp32": fp32, "int8": int8, "problems": problems}
