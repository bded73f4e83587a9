"""The web page and the OpenAPI document."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from flask import Blueprint, current_app, jsonify

blueprint = Blueprint("docs", __name__)
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi.json"


@cache
def openapi_document() -> dict:
    return json.loads(OPENAPI_FILE.read_text())


@blueprint.get("/")
def index():
    return current_app.send_static_file("index.html")


@blueprint.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())
