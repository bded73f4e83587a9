"""Inference on behalf of the views: preprocessing, batching, ONNX Runtime, metrics, response shaping.

The views hand over request data and get plain dicts back; they never touch ONNX Runtime or numpy.
"""

from __future__ import annotations

import time

import numpy as np

from service import metrics, visualize
from service.errors import InvalidImage, InvalidParameter, ServiceError, TooManyImages
from service.model import OnnxModel
from service.preprocessing import decode, normalize
from service.settings import Settings


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings

    # classify -------------------------------------------------------------------------------------------------
    def classify(self, model: OnnxModel, images: list[bytes], top_k: int | None) -> dict:
        probabilities = self.predict(model, self.preprocess(model, images))
        return {"model": model.name, "version": model.version,
                "predictions": [prediction(model.labels, row, top_k) for row in probabilities]}

    def preprocess(self, model: OnnxModel, images: list[bytes]) -> np.ndarray:
        started = time.perf_counter()
        decoded = np.stack([self._decode(model, data, index, len(images)) for index, data in enumerate(images)])
        batch = normalize(decoded, model.spec)
        metrics.PREPROCESS_LATENCY.labels(model.name, model.version).observe(time.perf_counter() - started)
        return batch

    def predict(self, model: OnnxModel, batch: np.ndarray) -> np.ndarray:
        """One ONNX Runtime call for the whole batch; counts the predicted labels."""
        started = time.perf_counter()
        probabilities = model.predict(batch)
        metrics.INFERENCE_LATENCY.labels(model.name, model.version).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(model.name, model.version).observe(len(batch))
        for label_index, count in zip(*np.unique(probabilities.argmax(1), return_counts=True)):
            metrics.PREDICTIONS.labels(model.name, model.version, model.labels[label_index]).inc(int(count))
        return probabilities

    def _decode(self, model: OnnxModel, data: bytes, index: int, count: int) -> np.ndarray:
        try:
            return decode(data, model.spec, self.settings.MAX_IMAGE_PIXELS)
        except ServiceError as exc:
            if count > 1:
                exc.message = f"Image {index} of {count}: {exc.message}"
            raise

    # inspect --------------------------------------------------------------------------------------------------
    def inspect(self, model: OnnxModel, image: bytes, class_label: str | None) -> dict:
        if class_label is not None and class_label not in model.labels:
            raise InvalidParameter(f"class={class_label!r} is not a label of {model.name}; "
                                   f"use one of {', '.join(model.labels)}.")
        batch = self.preprocess(model, [image])
        outputs = model.inspect(batch)
        probabilities = outputs["probabilities"][0]
        metrics.BATCH_SIZE.labels(model.name, model.version).observe(1)
        top = int(probabilities.argmax())
        metrics.PREDICTIONS.labels(model.name, model.version, model.labels[top]).inc()
        picture = visualize.input_image(batch[0], model.spec)
        stages = []
        for stage in model.metadata["inspection"]["stages"]:
            value = outputs[stage["name"]][0]
            described = {"name": stage["name"], "kind": stage["kind"], "shape": list(value.shape)}
            if value.ndim == 3:
                described["maps"] = visualize.feature_grid(value)
            else:
                described["values"] = value.tolist()
            stages.append(described)
        response = {
            "model": model.name, "version": model.version,
            "prediction": prediction(model.labels, probabilities, None),
            "input": {"shape": list(batch.shape[1:]), "png": visualize.png_data_url(picture),
                      "range": [float(batch.min()), float(batch.max())]},
            "stages": stages,
            "cam": None,
        }
        if "class_maps" in outputs:
            chosen = model.labels.index(class_label) if class_label else top
            response["cam"] = {"label": model.labels[chosen], "stage": model.metadata["inspection"]["cam_stage"],
                               **visualize.cam_overlay(outputs["class_maps"][0, chosen], picture)}
        return response

    def filters(self, model: OnnxModel) -> dict:
        weights = model.first_conv_filters()
        return {"model": model.name, "version": model.version,
                "stage": model.metadata["inspection"].get("first_conv"), "shape": list(weights.shape),
                "filters": visualize.filter_grid(weights)}

    # Open Inference Protocol -------------------------------------------------------------------------------------
    def infer_tensor(self, model: OnnxModel, batch: np.ndarray) -> np.ndarray:
        model.check_tensor(batch)
        return self.predict(model, np.ascontiguousarray(batch, dtype=np.float32))

    def infer_encoded(self, model: OnnxModel, images: list[bytes]) -> np.ndarray:
        if len(images) > self.settings.MAX_BATCH_IMAGES:
            raise TooManyImages(f"{len(images)} images in one request; the limit is "
                                f"{self.settings.MAX_BATCH_IMAGES}. Split the batch.")
        if not images:
            raise InvalidImage("The BYTES input holds no images.")
        return self.predict(model, self.preprocess(model, images))


def prediction(labels: list[str], probabilities: np.ndarray, top_k: int | None) -> dict:
    best = int(probabilities.argmax())
    result = {"label": labels[best], "confidence": float(probabilities[best]),
              "probabilities": {label: float(p) for label, p in zip(labels, probabilities)}}
    if top_k is not None:
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        result["top_k"] = [{"label": labels[i], "confidence": float(probabilities[i])} for i in order]
    return result
