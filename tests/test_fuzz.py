"""The API fuzzed on a real gunicorn against its own generated OpenAPI document, with every schemathesis check.

Every operation and every check (no 5xx, every response, header and status documented, data the document allows
accepted, data it refuses refused), seed 1, 40 generated requests for each operation that takes any input, on top of
the coverage and stateful phases: about 2,000 requests in 45 s on two busy cores.

What JSON Schema cannot say is given to the generator here, and nothing else: an image is an image (the document names
it with the formats ``image`` and ``image-base64``), and an input tensor's data holds as many values as its shape says.
"""

from __future__ import annotations

import base64
import math
from collections import Counter

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events as engine_events
from schemathesis.engine import from_schema

from service.preprocessing import IMAGE_MEDIA_TYPES
from tests.conftest import SHIPPED_STORE
from tests.helpers import GunicornServer, image_bytes

pytestmark = pytest.mark.slow

SEED = 1
EXAMPLES = 40
# Small images in each decoded format and in the awkward modes (greyscale, palette, alpha, 16-bit): the service's
# answers must not depend on which one the generator picks.
IMAGES = [image_bytes(fmt, width, height, seed, mode) for fmt, width, height, seed, mode in [
    ("PNG", 40, 30, 1, None), ("PNG", 8, 64, 2, "RGBA"), ("PNG", 33, 33, 3, "L"), ("PNG", 20, 12, 9, "I;16"),
    ("JPEG", 64, 48, 4, None), ("JPEG", 17, 29, 5, "L"), ("WEBP", 32, 32, 6, None), ("BMP", 24, 24, 7, None),
    ("GIF", 30, 20, 8, "P"), ("TIFF", 16, 40, 10, None)]]


def _base64_forms(data: bytes) -> list[str]:
    plain = base64.b64encode(data).decode()
    return [plain, "data:image/png;base64," + plain, base64.urlsafe_b64encode(data).decode().rstrip("=")]


schemathesis.openapi.format("image", st.sampled_from(IMAGES))
schemathesis.openapi.format("image-base64", st.sampled_from([text for data in IMAGES for text in _base64_forms(data)]))
for _media_type in (*IMAGE_MEDIA_TYPES, "application/octet-stream"):
    schemathesis.openapi.media_type(_media_type, st.sampled_from(IMAGES))


@schemathesis.hook
def map_case(context, case):
    """A valid tensor's `data` holds exactly as many values as its `shape` says (the document says so in words):
    valid requests are made so, keeping the generated values. Invalid ones are left as generated."""
    if case.meta is None or not case.meta.generation.mode.is_positive or not case.path.endswith("/infer"):
        return case
    if isinstance(case.body, dict) and isinstance(case.body.get("inputs"), list):
        for tensor in case.body["inputs"]:
            if isinstance(tensor, dict) and isinstance(tensor.get("shape"), list) and tensor.get("data"):
                needed = int(math.prod(tensor["shape"]))
                data = tensor["data"]
                tensor["data"] = (data * (needed // len(data) + 1))[:needed]
    return case


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = GunicornServer(tmp_path_factory.mktemp("fuzz"), MODEL_STORE=SHIPPED_STORE, WORKERS=1,
                             MODEL_POLL_SECONDS=0, QUEUE_TIMEOUT=60)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_server_keeps_its_document(server):
    """Schemathesis's own runner (what its CLI runs): the examples, coverage, fuzzing and stateful phases, and every
    check it has. Any failure is reported with the curl command that reproduces it. (Its pytest plugin's
    ``from_fixture`` fails on pytest 9.2, which has no ``Node._nodeid``.)"""
    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none"},  # no replays: seeded alone
        "request-timeout": 60,
        # A request over a documented limit (more images than MAX_IMAGES_PER_REQUEST) is refused with 413: a rejection.
        "checks": {"negative_data_rejection": {"expected-statuses": [
            "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]}},
    })
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)
    problems, per_operation, per_phase, fuzzed = [], Counter(), Counter(), Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, engine_events.ScenarioFinished):
            per_phase[event.phase.value] += len(event.recorder.cases)
            per_operation.update(node.value.operation.label for node in event.recorder.cases.values())
            fuzzed.update(node.value.operation.label for node in event.recorder.cases.values()
                          if event.phase.value == "fuzzing")
            for checks in event.recorder.checks.values():
                problems += [f"{check.name}: {check.failure_info.failure.title}\n  {check.failure_info.failure.message}"
                             f"\n  {check.failure_info.code_sample}" for check in checks if check.failure_info]
        elif isinstance(event, engine_events.NonFatalError):
            problems.append(f"error in {event.label}: {event.info.format()}")
        elif isinstance(event, engine_events.FatalError):
            problems.append(f"fatal: {event.exception!r}")
    print(f"schemathesis: {sum(per_phase.values())} cases; by phase {dict(per_phase)}; fewest for one operation: "
          f"{per_operation.most_common()[-1]}")
    unique = list(dict.fromkeys(problems))
    assert not unique, f"{len(unique)} problems:\n" + "\n".join(unique[:30])
    documented = {f"{method.upper()} {path}" for path, item in schema.raw_schema["paths"].items() for method in item
                  if path != "/openapi.json"}  # the document itself is read, not fuzzed
    assert documented <= set(per_operation), f"never tried: {sorted(documented - set(per_operation))}"
    with_inputs = {f"{method.upper()} {path}" for path, item in schema.raw_schema["paths"].items()
                   for method, operation in item.items() if operation.get("parameters") or operation.get("requestBody")}
    assert all(fuzzed[label] >= EXAMPLES for label in with_inputs), fuzzed  # the others have one request each
