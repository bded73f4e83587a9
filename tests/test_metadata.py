"""metadata.json has one typed schema (service/metadata.py): export writes it and the service reads it.

A version whose metadata misses or mistypes a field fails with the field's name, and the schema is published as JSON
Schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from service.metadata import SCHEMA_FILE, ModelMetadata, json_schema, schema_text
from service.registry import ModelRegistry
from service.settings import Settings

SHIPPED_STORE = Path(__file__).resolve().parent.parent / "model_store"
SHIPPED_VERSIONS = sorted(path.parent for path in SHIPPED_STORE.glob("*/*/metadata.json"))
REQUIRED_FIELDS = sorted(name for name, spec in ModelMetadata.model_fields.items() if spec.is_required())
NESTED_FIELDS = [("input", "preprocessing", "mean"), ("files", "model", "sha256"), ("metrics", "calibration",
                 "temperature"), ("metrics", "domain", "threshold"), ("inspection", "stages")]


@pytest.mark.parametrize("folder", SHIPPED_VERSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_version_follows_the_schema_and_round_trips(folder, tmp_path):
    metadata = ModelMetadata.read(folder / "metadata.json")
    metadata.write(tmp_path / "metadata.json")
    assert ModelMetadata.read(tmp_path / "metadata.json") == metadata
    Draft202012Validator(json_schema()).validate(json.loads((folder / "metadata.json").read_text()))


def test_the_published_schema_is_the_code_and_is_served(client):
    assert SCHEMA_FILE.read_text() == schema_text(), "run: python -m service.metadata"
    Draft202012Validator.check_schema(json_schema())
    response = client.get("/schemas/metadata.json")
    assert response.status_code == 200 and response.get_json() == json_schema()


def _broken_store(tmp_path: Path, change) -> Path:
    source = SHIPPED_VERSIONS[0]
    folder = tmp_path / "store" / source.parent.name / source.name
    shutil.copytree(source, folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    change(metadata)
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def _failure(folder: Path) -> str:
    registry = ModelRegistry(Settings.from_env({}, MODEL_STORE=folder.parent.parent, DEFAULT_MODEL=folder.parent.name,
                                               MODEL_POLL_SECONDS=0))
    registry.load_all()
    failure = registry.failure(folder.parent.name, folder.name)
    assert failure is not None and not registry.ready
    return failure.reason


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_a_missing_required_field_fails_the_version_naming_it(tmp_path, field):
    folder = _broken_store(tmp_path, lambda metadata: metadata.pop(field))
    reason = _failure(folder)
    assert f"{field}: field required" in reason and reason.startswith("metadata.json:")


@pytest.mark.parametrize("path", NESTED_FIELDS, ids=".".join)
def test_a_missing_nested_field_is_named_by_its_path(tmp_path, path):
    def drop(metadata):
        holder = metadata
        for key in path[:-1]:
            holder = holder[key]
        holder.pop(path[-1])

    assert ".".join(path) + ": field required" in _failure(_broken_store(tmp_path, drop))


@pytest.mark.parametrize("path, value, expected", [
    (("labels",), "dog", "labels: input should be a valid array"),
    (("input", "preprocessing", "std"), [0.2, 0.0, 0.2], "input.preprocessing.std.1: input should be greater than 0"),
    (("files", "model", "sha256"), "not-a-digest", "files.model.sha256: string should match pattern"),
    (("files", "model", "path"), "../elsewhere.onnx", "files.model.path: string should match pattern"),
    (("input", "shape"), [-1, 3, 64, 64], "does not match preprocessing"),
])
def test_a_mistyped_field_fails_the_version_naming_it(tmp_path, path, value, expected):
    def change(metadata):
        holder = metadata
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value

    assert expected in _failure(_broken_store(tmp_path, change))
