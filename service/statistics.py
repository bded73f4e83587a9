"""Per model version statistics in Triton's shape (its statistics extension), aggregated over every worker.

Read from the Prometheus metrics the inference pipeline records (service/metrics.py), so the figures are those of
the whole server, not of the worker that answers, and match what /metrics exports: success and fail (request count
and cumulative time, queueing to answer), queue, compute_input (decode and preprocess, or reading the tensor),
compute_infer (the ONNX Runtime call each request ran in), compute_output (shaping the answer), inference_count
(images), execution_count (ONNX Runtime calls, fewer than requests when batching merged them) and per batch size.
There is no response cache: cache_hit and cache_miss stay 0. Durations are in nanoseconds, as Triton gives them.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from service import metrics, metrics_files

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def model_statistics(versions: list[tuple[str, str]]) -> list[dict]:
    """The statistics of each (model, version), in that order; zeros for one that has not answered yet."""
    samples = _samples()
    return [_one(name, version, samples) for name, version in versions]


def versions_covered(registry, name: str | None, version: str | None) -> list[tuple[str, str]]:
    """The (model, version) pairs a statistics call covers: every loaded version, or those of a model, or one; the
    registry's typed error (404, 503) for a model or version it cannot name."""
    if name is None:
        return [(model.name, model.version) for model in registry.loaded()]
    if version is not None:
        model = registry.get(name, version)
        return [(model.name, model.version)]
    registry.get(name)  # 404 for an unknown model, with the models there are
    return [(name, loaded) for loaded in registry.loaded_versions(name)]


def _samples() -> dict[str, list]:
    """Every sample of the metrics that statistics read, by sample name."""
    if metrics.MULTIPROCESS_FOLDER:
        registry = CollectorRegistry()
        with metrics_files.locked(metrics.MULTIPROCESS_FOLDER, exclusive=False):
            MultiProcessCollector(registry, path=metrics.MULTIPROCESS_FOLDER)
            families = list(registry.collect())
    else:
        families = list(REGISTRY.collect())
    wanted = {f"{metrics.PREFIX}_model_{name}" for name in (
        "request_duration_seconds", "stage_duration_seconds", "images", "executions", "execution_seconds",
        "last_inference_timestamp_seconds")}
    found: dict[str, list] = defaultdict(list)
    for family in families:
        if family.name in wanted:
            for sample in family.samples:
                found[sample.name].append(sample)
    return found


def _one(name: str, version: str, samples: dict[str, list]) -> dict:
    def matching(sample_name: str, **labels) -> list:
        return [s for s in samples.get(sample_name, []) if s.labels.get("model") == name
                and s.labels.get("version") == version and all(s.labels.get(k) == v for k, v in labels.items())]

    def total(sample_name: str, **labels) -> float:
        return sum(s.value for s in matching(sample_name, **labels))

    def duration(family: str, **labels) -> dict:
        return {"count": int(total(f"{family}_count", **labels)), "ns": int(total(f"{family}_sum", **labels) * 1e9)}

    requests = f"{metrics.PREFIX}_model_request_duration_seconds"
    stages = f"{metrics.PREFIX}_model_stage_duration_seconds"
    inference_stats = {"success": duration(requests, outcome="success"), "fail": duration(requests, outcome="fail")}
    for stage in metrics.STAGES:
        inference_stats[stage] = duration(stages, stage=stage)
    # The three compute stages are observed together per request (service/pipeline.py); one count for all three, so
    # a read that lands between those observations (other workers' files are read one by one) is not torn.
    for stage in ("compute_infer", "compute_output"):
        inference_stats[stage]["count"] = inference_stats["compute_input"]["count"]
    inference_stats.update(cache_hit={"count": 0, "ns": 0}, cache_miss={"count": 0, "ns": 0})
    executions = f"{metrics.PREFIX}_model_executions_total"
    batch_stats = []
    for size in sorted({int(s.labels["batch_size"]) for s in matching(executions)}):
        count = int(total(executions, batch_size=str(size)))
        batch_stats.append({"batch_size": size, **{
            stage: {"count": count, "ns": int(total(f"{metrics.PREFIX}_model_execution_seconds_total",
                                                    batch_size=str(size), stage=stage) * 1e9)}
            for stage in ("compute_input", "compute_infer", "compute_output")}})
    last = max((s.value for s in matching(f"{metrics.PREFIX}_model_last_inference_timestamp_seconds")), default=0.0)
    return {"name": name, "version": version, "last_inference": int(last * 1000),
            "inference_count": int(total(f"{metrics.PREFIX}_model_images_total")),
            "execution_count": int(total(executions)), "inference_stats": inference_stats,
            "batch_stats": batch_stats}
