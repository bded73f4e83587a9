"""Liveness, readiness and the metrics scrape."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service import metrics
from service.api import state

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def liveness():
    return jsonify(status="alive")


@blueprint.get("/readyz")
def readiness():
    problem = state().registry.readiness_problem()
    if problem:
        return jsonify(status="not ready", reason=problem), 503
    return jsonify(status="ready")


@blueprint.get("/metrics")
def scrape():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
