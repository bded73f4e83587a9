"""Liveness, readiness and the metrics scrape."""

from __future__ import annotations

from flask import Blueprint, Response

from service import metrics
from service.api import reply, state
from service.api.openapi import Reply, documented
from service.api.schemas import Error, Liveness, NotReadyStatus, Readiness, Unhealthy

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
@documented("Liveness", "200 while the worker answers; never depends on the models. 503 with the reason once an "
            "inference outran INFERENCE_WATCHDOG_SECONDS: that worker is being replaced.", tags=["health"],
            responses={200: Liveness, 503: Unhealthy})
def liveness():
    stuck = state().pipeline.queue.unhealthy
    if stuck:
        return reply(Unhealthy, {"status": "unhealthy", "reason": stuck}, 503)
    return reply(Liveness, {"status": "alive"})


@blueprint.get("/readyz")
@documented("Readiness", "200 once every loadable model is loaded and warmed and the default model is among them; "
            "503 with the reason before that, when no model could be loaded, and once a graceful shutdown begins.",
            tags=["health"], responses={200: Readiness, 503: NotReadyStatus})
def readiness():
    problem = state().registry.readiness_problem()
    if problem:
        return reply(NotReadyStatus, {"status": "not ready", "reason": problem}, 503)
    return reply(Readiness, {"status": "ready"})


@blueprint.get("/metrics")
@documented("Prometheus metrics", "The Prometheus text exposition, over every gunicorn worker. Probes and scrapes "
            "are not counted in the request metrics.", tags=["health"],
            responses={200: Reply("The metrics.", {"text/plain": {"type": "string"}}), 503: Error})
def scrape():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
