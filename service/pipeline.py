"""The inference pipeline, on behalf of the views: decode and preprocess → model → shaped answer, plus metrics.

The views hand over plain request data (bytes, parsed JSON) and get plain dicts back; they never touch ONNX Runtime
or numpy. Every public method runs its CPU work through the inference queue (service/inference_queue.py): on a real
inference thread, bounded in how many wait and for how long.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from service import contract, metrics, oip, request_context, visualize
from service.errors import DecodeBudgetExceeded, InvalidParameter, ServiceError
from service.inference_queue import InferenceQueue
from service.model import OnnxModel, Outputs
from service.preprocessing import decode_opened, decoded_bytes, normalize, open_for, open_image
from service.settings import Settings

# What "small" means for work that may skip the hand-over to a thread: each image at most this many pixels (its
# decode then takes tens of microseconds) and, on average, this many bytes.
INLINE_MAX_PIXELS = 128 * 128
INLINE_MAX_BYTES = 64 * 1024


def _pixels(image) -> int:
    width, height = image.size
    return width * height


class InferencePipeline:
    def __init__(self, settings: Settings, queue: InferenceQueue):
        self.settings = settings
        self.queue = queue

    # the entry points: each runs on an inference thread ------------------------------------------------------------
    def classify(self, model: OnnxModel, images: list[bytes], top_k: int | None) -> dict:
        """Requests for the same model version that wait together share one ONNX Runtime call (/v2 infer too)."""
        def answer(outputs: Outputs) -> dict:
            return {"model": model.name, "version": model.version, "precision": model.precision,
                    "predictions": predictions(model.labels, outputs, top_k)}

        opened = self._opened_if_small(model, images)
        return self._inference(model, lambda: self.preprocess(model, images, opened), answer, len(images),
                               inline=opened is not None)

    def inspect(self, model: OnnxModel, image: bytes, class_label: str | None) -> dict:
        return self.queue.run(self._inspect, model, image, class_label)

    def filters(self, model: OnnxModel) -> dict:
        return self.queue.run(self._filters, model)

    def infer(self, model: OnnxModel, request: dict, binary: bytes,
              patience: float | None = None) -> tuple[dict, list[bytes]]:
        """An Open Inference Protocol request (its JSON and binary part, REST or gRPC alike) → the response JSON and
        binary blobs. Batched with classify requests for the same version: both become the model's input batch."""
        images = oip.image_count(request, self.settings.MAX_IMAGES_PER_REQUEST)
        plan = oip.requested_outputs(request, model)  # a bad "outputs" fails before the request queues

        def prepare() -> np.ndarray:
            tensor = oip.input_tensor(request, model, binary, self.settings.MAX_IMAGES_PER_REQUEST)
            if isinstance(tensor, np.ndarray):  # FP32, of the model's input shape: input_tensor has checked it
                return np.ascontiguousarray(tensor, dtype=np.float32)
            return self.preprocess(model, tensor)  # encoded images, as many as the shape says

        return self._inference(model, prepare, lambda outputs: oip.response(request, model, outputs, plan), images,
                               patience)

    # batched inference ---------------------------------------------------------------------------------------------
    def _opened_if_small(self, model: OnnxModel, images: list[bytes]) -> list | None:
        """The images, opened (header only), when decoding and running them costs less than handing them to a
        thread: small encoded images (read from their headers alone), through a graph whose cost is fixed by its
        input shape, at the speed measured at load, while this worker serves no other request (under concurrency
        the thread wins: requests that wait together share one ONNX Runtime call). Such work may run on the event
        loop (service/inference_queue.py). Otherwise None."""
        budget = self.settings.INLINE_WORK_SECONDS
        if not budget or not model.fixed_cost or model.image_seconds * len(images) > budget:
            return None
        if not request_context.alone():  # other clients: a thread lets their requests be read and batch with it
            return None
        if sum(len(data) for data in images) > INLINE_MAX_BYTES * len(images):
            return None
        try:
            opened = [open_image(data, self.settings.MAX_IMAGE_PIXELS) for data in images]
        except ServiceError:  # not an image: the thread's decode answers it, as for any other request
            return None
        return opened if all(_pixels(image) <= INLINE_MAX_PIXELS for image in opened) else None

    def _inference(self, model: OnnxModel, prepare: Callable[[], np.ndarray], answer: Callable[[Outputs], Any],
                   images: int, patience: float | None = None, inline: bool = False):
        """One request through the queue, batched with the others waiting for this version; its outcome and time
        are counted for the statistics (service/statistics.py) and its stages written to its request context."""
        series = metrics.version_series(model.name, model.version)
        context = request_context.current()
        if context is not None:
            context.model, context.version, context.precision = model.name, model.version, model.precision
            context.images = images
        queued = time.perf_counter()
        try:
            result = self.queue.run_batched(series.key, self._run_batch, model, prepare, answer, queued, context,
                                            size=images, patience=patience, inline=inline)
        except ServiceError:
            series.outcomes["fail"].observe(time.perf_counter() - queued)
            raise
        series.outcomes["success"].observe(time.perf_counter() - queued)
        return result

    def _run_batch(self, requests: list[tuple]) -> list:
        """Several requests → one answer (or the client error of its own input) each, in order: every request's
        input is prepared, the good ones run as one ONNX Runtime call, and each shapes its own answer."""
        model: OnnxModel = requests[0][0]
        series = metrics.version_series(model.name, model.version)
        stages = series.stages
        started = time.perf_counter()
        batches: list[np.ndarray | ServiceError] = []
        input_seconds: list[float] = []
        for _, prepare, _, queued, context in requests:
            stages["queue"].observe(started - queued)
            began = time.perf_counter()
            try:
                batches.append(prepare())
            except ServiceError as error:  # one request's bad input fails that request only
                batches.append(error)
            took = time.perf_counter() - began
            input_seconds.append(took)
            if context is not None:
                context.add("queue", started - queued, queued)
                context.add("compute_input", took, began)
        prepared = time.perf_counter()
        good = [batch for batch in batches if isinstance(batch, np.ndarray)]
        images = sum(len(b) for b in good)
        if len(good) == 1:  # one request: its outputs as they are (splitting costs 20 us)
            outputs = iter([self.predict(model, good[0])])
        else:
            outputs = iter(self.predict(model, np.concatenate(good)).split([len(b) for b in good]) if good else ())
        inferred = time.perf_counter()
        answers = []
        for (_, _, answer, _, context), batch, input_took in zip(requests, batches, input_seconds):
            if isinstance(batch, ServiceError):
                answers.append(batch)
                continue
            began = time.perf_counter()
            try:
                answers.append(answer(next(outputs)))
            except ServiceError as error:
                answers.append(error)
            took = time.perf_counter() - began
            # A request's three compute stages are counted together, once it has them all (as Triton counts
            # them): statistics read mid-batch never see one stage ahead of another (perf_analyzer checks).
            stages["compute_input"].observe(input_took)
            stages["compute_infer"].observe(inferred - prepared)
            stages["compute_output"].observe(took)
            if context is not None:
                context.add("compute_infer", inferred - prepared, prepared)
                context.add("compute_output", took, began)
                context.batch_size = images
        if good:
            self._count_execution(series, images, prepared - started, inferred - prepared,
                                  time.perf_counter() - inferred)
        return answers

    @staticmethod
    def _count_execution(series: metrics.VersionSeries, images: int, compute_input: float, compute_infer: float,
                         compute_output: float) -> None:
        calls, seconds = series.execution(images)
        calls.inc()
        seconds["compute_input"].inc(compute_input)
        seconds["compute_infer"].inc(compute_infer)
        seconds["compute_output"].inc(compute_output)
        series.images.inc(images)
        series.last_inference.set(time.time())

    def preprocess(self, model: OnnxModel, images: list[bytes], opened: list | None = None) -> np.ndarray:
        """Every image's header is read (``opened``: already, by open_image) and the request's decoding cost
        checked (DECODE_BUDGET_BYTES) before any pixel is decoded; then each is decoded, reduced to the input size
        and dropped, one at a time."""
        started = time.perf_counter()
        count = len(images)
        opened = [self._each(index, count, open_for, data, model.spec, self.settings.MAX_IMAGE_PIXELS, image)
                  for index, (data, image) in enumerate(zip(images, opened or [None] * count))]
        needed = sum(decoded_bytes(image) for image in opened)
        if needed > self.settings.DECODE_BUDGET_BYTES:
            raise DecodeBudgetExceeded(
                f"Decoding {'these images' if count > 1 else 'this image'} would take {needed / 2**20:.0f} MiB; "
                f"the limit per request is {self.settings.DECODE_BUDGET_BYTES / 2**20:.0f} MiB "
                "(DECODE_BUDGET_BYTES). Send smaller images, or fewer per request.")
        pictures = [self._each(index, count, decode_opened, image, model.spec) for index, image in enumerate(opened)]
        decoded = pictures[0][None] if count == 1 else np.stack(pictures)  # np.stack costs 10 us for one
        batch = normalize(decoded, model.spec)
        metrics.version_series(model.name, model.version).preprocess.observe(time.perf_counter() - started)
        return batch

    def predict(self, model: OnnxModel, batch: np.ndarray) -> Outputs:
        """One ONNX Runtime call for the whole batch; counts the predicted labels and records drift metrics."""
        started = time.perf_counter()
        outputs = model.predict(batch)
        series = metrics.version_series(model.name, model.version)
        series.inference.observe(time.perf_counter() - started)
        series.batch_size.observe(len(batch))
        self._count(model, outputs)
        return outputs

    @staticmethod
    def _count(model: OnnxModel, outputs: Outputs) -> None:
        series = metrics.version_series(model.name, model.version)
        # Counted in Python: np.unique costs 40 us, more than the rest of this for the usual one or few images.
        for label_index, count in Counter(outputs.probabilities.argmax(1).tolist()).items():
            series.prediction(model.labels[label_index]).inc(count)
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
        answer = Outputs(*(outputs[name] for name in contract.OUTPUT_NAMES))
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
