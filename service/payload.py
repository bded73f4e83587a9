"""Request payloads without the web framework: strict JSON, base64 images, and the one batch-size check.

Shared by the HTTP layer (service/inputs.py) and the Open Inference Protocol's tensors (service/oip.py), which runs
on the inference path and so imports no Flask.
"""

from __future__ import annotations

import base64
import binascii
import json

from service.errors import InvalidBase64, InvalidJSON, TooManyImages


def parse_json(body: bytes | str):
    """Strict JSON: NaN and Infinity are refused, and so is anything the parser chokes on (nesting thousands deep,
    an integer of thousands of digits): an InvalidJSON, never an internal error."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"The body is not valid JSON ({exc}).") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON(f"The JSON could not be read: {str(exc)[:200] or type(exc).__name__}.") from exc


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def decode_base64(text: str, index: int = 0) -> bytes:
    """Plain or URL-safe base64, or a ``data:image/...;base64,`` URL."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise InvalidBase64(f"Image {index}: only base64 data: URLs are supported.")
    cleaned = "".join(text.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"Image {index} is not valid base64 ({exc}).") from exc



def check_batch_size(count: int, max_images: int) -> None:
    """The one check of MAX_IMAGES_PER_REQUEST, for every form a request takes (/v1 bodies, /v2 tensors)."""
    if count > max_images:
        raise TooManyImages(f"{count} images in one request; the limit is {max_images}. Split the batch.")
