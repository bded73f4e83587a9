"""HTTP request bodies → a list of encoded images, in request order.

Accepted: one raw image (``Content-Type: image/*`` or ``application/octet-stream``), ``multipart/form-data`` with one
or more file parts, or ``application/json`` ``{"images": ["<base64 or data: URL>", ...]}``.
"""

from __future__ import annotations

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from service.errors import EmptyBody, InvalidJSON, TooManyImages, UnsupportedMediaType
from service.payload import check_batch_size, decode_base64, parse_json
from service.preprocessing import IMAGE_FORMATS, IMAGE_MEDIA_TYPES

ACCEPTED = ", ".join(types[0] for types, _ in IMAGE_FORMATS.values()) + ", multipart/form-data or application/json"
BODY_ENVIRON_KEY = "convserve.body"  # the body as the HTTP layer read it (service/api/__init__.py)
RAW_IMAGE_TYPES = IMAGE_MEDIA_TYPES | {"application/octet-stream"}  # a body that is one encoded image


def request_body(request: Request) -> bytes:
    """The request's body: the bytes the HTTP layer already read, not a copy (Werkzeug's get_data copies twice, and
    a copy of a 10 MB body per request is what let many large bodies at once take a worker past its memory)."""
    body = request.environ.get(BODY_ENVIRON_KEY)
    return body if body is not None else request.get_data(cache=False)


def images_from_request(request: Request, max_images: int) -> list[bytes]:
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        try:
            images = [part.read() for _, part in request.files.items(multi=True)]
        except RequestEntityTooLarge as exc:  # more parts than MAX_FORM_PARTS
            raise TooManyImages(f"The multipart body has more than {request.max_form_parts} parts; the limit is "
                                f"{max_images} images. Split the batch.") from exc
        if not images:
            raise EmptyBody("The multipart body has no file parts; send each image as a file part (-F image=@x.jpg).")
    elif mimetype == "application/json":
        images = _images_from_json(request_body(request))
    elif mimetype in RAW_IMAGE_TYPES:
        images = raw_image(request_body(request))
    elif not mimetype and not request_body(request):
        raise EmptyBody(f"The request body is empty; send an image as {ACCEPTED}.")
    else:
        raise UnsupportedMediaType(f"Content-Type {mimetype or '(none)'!r} is not supported; use {ACCEPTED}.")
    check_batch_size(len(images), max_images)
    return images


def raw_image(body: bytes) -> list[bytes]:
    if not body:
        raise EmptyBody("The request body is empty; send the image bytes as the body.")
    return [body]


def _images_from_json(body: bytes) -> list[bytes]:
    if not body:
        raise EmptyBody('The request body is empty; send {"images": ["<base64>", ...]}.')
    document = parse_json(body)
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise InvalidJSON('Expected {"images": ["<base64 or data: URL>", ...]} with at least one string.')
    return [decode_base64(text, index) for index, text in enumerate(images)]

