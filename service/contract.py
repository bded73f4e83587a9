"""The names training and the service share, each defined once: graph input and outputs, precisions, shed reasons.

The outputs carry their types; the precisions are those a version can serve in; the shed reasons say why a request
got 503 overloaded. Plain Python (no Flask, no numpy), so the training package, the metadata schema, the HTTP and
gRPC layers and the model all import it; tests/test_architecture.py fails when one of these strings is written out
in more than one other module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ---- the graph ------------------------------------------------------------------------------------------------------

INPUT = "input"  # the graph's one input: float32 [N, 3, H, W], preprocessed as metadata.json says


@dataclass(frozen=True)
class Output:
    name: str
    datatype: Literal["FP32", "BOOL"]  # the Open Inference Protocol's name for its element type
    numpy_dtype: str  # its elements on the wire and in ONNX Runtime's answer
    per_label: bool  # [N, labels]; otherwise one value per image, [N]


PROBABILITIES = "probabilities"  # calibrated, a row per image summing to 1
DOMAIN_SCORE = "domain_score"  # how much the image looks like the training images
IN_DOMAIN = "in_domain"  # domain_score above the version's threshold: False is the "none of these" answer
# The classify graph's outputs, in this order (the order of ONNX Runtime's answer).
OUTPUTS = (Output(PROBABILITIES, "FP32", "<f4", per_label=True),
           Output(DOMAIN_SCORE, "FP32", "<f4", per_label=False),
           Output(IN_DOMAIN, "BOOL", "?", per_label=False))
OUTPUT_NAMES = tuple(output.name for output in OUTPUTS)
CLASSIFIED_OUTPUT = PROBABILITIES  # the output the classification extension ranks
LOGITS = "logits"  # exported beside the outputs so training can calibrate; never served
OutputName = Literal[OUTPUT_NAMES]

# ---- precisions -----------------------------------------------------------------------------------------------------

INT8 = "int8"  # the quantized graph, when a version has one and it verifies on this CPU
FP32 = "fp32"  # the exported graph: always present, and the reference the others are checked against
PRECISIONS = (INT8, FP32)
Precision = Literal[PRECISIONS]

# ---- shedding: why a request got 503 overloaded instead of a place in the queue ------------------------------------

QUEUE_FULL = "queue_full"  # QUEUE_DEPTH requests were already waiting
QUEUE_TIMEOUT = "queue_timeout"  # it waited QUEUE_TIMEOUT (or 40 % of its gRPC deadline) without a thread
BODY_BUDGET = "body_budget"  # the bodies held at once would pass BODY_BUFFER_BYTES
SHED_REASONS = (QUEUE_FULL, QUEUE_TIMEOUT, BODY_BUDGET)
