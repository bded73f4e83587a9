"""The inference pipeline, on behalf of the views: decode and preprocess → model → shaped answer, plus metrics.

The views hand over plain request data (bytes, parsed JSON) and get plain dicts back; they never touch ONNX Runtime
or numpy. Every public method runs its CPU work through the inference queue (service/scheduler.py): on a real
inference thread, bounded in how many wait and for how long.
"""

from __future__ import annotations

import time

import numpy as np

from service import metrics, oip, visualize
from service.errors import DecodeBudgetExceeded, InvalidParameter, ServiceError
from service.model import CLASSIFY_OUTPUTS, OnnxModel, Outputs
from service.preprocessing import decode_opened, decoded_bytes, normalize, open_for
from service.scheduler import InferenceQueue
from service.settings import Settings


class InferencePipeline:
    def __init__(self, settings: Settings, queue: InferenceQueue):
        self.settings = settings
        self.queue = queue

    # the entry points: each runs on an inference thread ------------------------------------------------------------
    def classify(self, model: OnnxModel, images: list[bytes], top_k: int | None) -> dict:
        """Requests for the same model version that wait together share one ONNX Runtime call."""
        return self.queue.run_batched((model.name, model.version), self._classify_batch, model, images, top_k,
                                      size=len(images))

    def inspect(self, model: OnnxModel, image: bytes, class_label: str | None) -> dict:
        return self.queue.run(self._inspect, model, image, class_label)

    def filters(self, model: OnnxModel) -> dict:
        return self.queue.run(self._filters, model)

    def infer(self, model: OnnxModel, request: dict, binary: bytes) -> tuple[dict, list[bytes]]:
        """An Open Inference Protocol request (its JSON and binary part) → the response JSON and binary blobs."""
        return self.queue.run(self._infer, model, request, binary)

    # classify -------------------------------------------------------------------------------------------------
    def _classify_batch(self, requests: list[tuple[OnnxModel, list[bytes], int | None]]) -> list:
        """Several classify requests → one answer (or the client error of its own images) each, in order."""
        model = requests[0][0]
        batches: list[np.ndarray | ServiceError] = []
        for _, images, _ in requests:
            try:
                batches.append(self.preprocess(model, images))
            except ServiceError as error:  # one request's bad image fails that request only
                batches.append(error)
        good = [batch for batch in batches if isinstance(batch, np.ndarray)]
        outputs = iter(self.predict(model, np.concatenate(good)).split([len(b) for b in good]) if good else ())
        answers = []
        for (_, _, top_k), batch in zip(requests, batches):
            if isinstance(batch, ServiceError):
                answers.append(batch)
                continue
            answers.append({"model": model.name, "version": model.version, "precision": model.precision,
                            "predictions": predictions(model.labels, next(outputs), top_k)})
        return answers

    def preprocess(self, model: OnnxModel, images: list[bytes]) -> np.ndarray:
        """Every image's header is read and the request's decoding cost checked (DECODE_BUDGET_BYTES) before any
        pixel is decoded; then each is decoded, reduced to the input size and dropped, one at a time."""
        started = time.perf_counter()
        count = len(images)
        opened = [self._each(index, count, open_for, data, model.spec, self.settings.MAX_IMAGE_PIXELS)
                  for index, data in enumerate(images)]
        needed = sum(decoded_bytes(image) for image in opened)
        if needed > self.settings.DECODE_BUDGET_BYTES:
            raise DecodeBudgetExceeded(
                f"Decoding {'these images' if count > 1 else 'this image'} would take {needed / 2**20:.0f} MiB; "
                f"the limit per request is {self.settings.DECODE_BUDGET_BYTES / 2**20:.0f} MiB "
                "(DECODE_BUDGET_BYTES). Send smaller images, or fewer per request.")
        decoded = np.stack([self._each(index, count, decode_opened, image, model.spec)
                            for index, image in enumerate(opened)])
        batch = normalize(decoded, model.spec)
        metrics.PREPROCESS_LATENCY.labels(model.name, model.version).observe(time.perf_counter() - started)
        return batch

    def predict(self, model: OnnxModel, batch: np.ndarray) -> Outputs:
        """One ONNX Runtime call for the whole batch; counts the predicted labels and records drift metrics."""
        started = time.perf_counter()
        outputs = model.predict(batch)
        metrics.INFERENCE_LATENCY.labels(model.name, model.version).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(model.name, model.version).observe(len(batch))
        self._count(model, outputs)
        return outputs

    @staticmethod
    def _count(model: OnnxModel, outputs: Outputs) -> None:
        for label_index, count in zip(*np.unique(outputs.probabilities.argmax(1), return_counts=True)):
            metrics.PREDICTIONS.labels(model.name, model.version, model.labels[label_index]).inc(int(count))
        metrics.record_answers(model.name, model.version, outputs.probabilities.max(1), outputs.domain_score,
                               outputs.in_domain)

    @staticmethod
    def _each(index: int, count: int, step, *args):
        """One image's step; a client error names the image when the request has several."""
        try:
            return step(*args)
        except ServiceError as exc:
            if count > 1:
                exc.message = f"Image {index} of {count}: {exc.message}"
            raise

    # inspect --------------------------------------------------------------------------------------------------
    def _inspect(self, model: OnnxModel, image: bytes, class_label: str | None) -> dict:
        if class_label is not None and class_label not in model.labels:
            raise InvalidParameter(f"class={class_label!r} is not a label of {model.name}; "
                                   f"use one of {', '.join(model.labels)}.")
        batch = self.preprocess(model, [image])
        outputs = model.inspect(batch)
        answer = Outputs(*(outputs[name] for name in CLASSIFY_OUTPUTS))
        probabilities = answer.probabilities[0]
        metrics.BATCH_SIZE.labels(model.name, model.version).observe(1)
        top = int(probabilities.argmax())
        self._count(model, answer)
        picture = visualize.input_image(batch[0], model.spec)
        stages = []
        for stage in model.metadata.inspection.stages:
            value = outputs[stage.name][0]
            described = {"name": stage.name, "kind": stage.kind, "shape": list(value.shape)}
            if value.ndim == 3:
                described["maps"] = visualize.feature_grid(value)
            else:
                described["values"] = value.tolist()
            stages.append(described)
        response = {
            "model": model.name, "version": model.version,
            "prediction": predictions(model.labels, answer, None)[0],
            "input": {"shape": list(batch.shape[1:]), "png": visualize.png_data_url(picture),
                      "range": [float(batch.min()), float(batch.max())]},
            "stages": stages,
            "cam": None,
        }
        if "class_maps" in outputs:
            chosen = model.labels.index(class_label) if class_label else top
            response["cam"] = {"label": model.labels[chosen], "stage": model.metadata.inspection.cam_stage,
                               **visualize.cam_overlay(outputs["class_maps"][0, chosen], picture)}
        return response

    def _filters(self, model: OnnxModel) -> dict:
        weights = model.first_conv_filters()
        return {"model": model.name, "version": model.version,
                "stage": model.metadata.inspection.first_conv, "shape": list(weights.shape),
                "filters": visualize.filter_grid(weights)}

    # Open Inference Protocol -------------------------------------------------------------------------------------
    def _infer(self, model: OnnxModel, request: dict, binary: bytes) -> tuple[dict, list[bytes]]:
        tensor = oip.input_tensor(request, model, binary, self.settings.MAX_BATCH_IMAGES)
        if isinstance(tensor, np.ndarray):  # FP32, of the model's input shape: input_tensor has checked it
            outputs = self.predict(model, np.ascontiguousarray(tensor, dtype=np.float32))
        else:  # encoded images, as many as the shape says: input_tensor has checked that count
            outputs = self.predict(model, self.preprocess(model, tensor))
        return oip.response(request, model, outputs)


def predictions(labels: list[str], outputs: Outputs, top_k: int | None) -> list[dict]:
    """One answer per image: the top label, calibrated probabilities, and whether it looks like any label at all."""
    answers = []
    for probabilities, score, in_domain in zip(outputs.probabilities, outputs.domain_score, outputs.in_domain):
        best = int(probabilities.argmax())
        result = {"label": labels[best], "confidence": float(probabilities[best]),
                  "probabilities": {label: float(p) for label, p in zip(labels, probabilities)},
                  "in_domain": bool(in_domain), "domain_score": float(score)}
        if top_k is not None:
            order = np.argsort(-probabilities, kind="stable")[:top_k]
            result["top_k"] = [{"label": labels[i], "confidence": float(probabilities[i])} for i in order]
        answers.append(result)
    return answers
