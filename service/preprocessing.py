"""Image bytes → model input: the one definition of preprocessing.

Used by the service for every request and by training to read data and evaluate, so both see identical arrays.
No torch here. The steps, driven by a model's ``InputSpec`` (stored in its metadata.json):

decode → EXIF orientation → RGB → centre crop to the input's aspect ratio → bilinear resize → scale → normalize.

JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, "draft mode") when the image is much larger than the
input: a 1920×1080 photo becomes 240×135 before resizing, which is several times faster and looks the same at 32×32.
"""

from __future__ import annotations

import io
import warnings
from typing import Annotated, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ImageTooLarge, InvalidImage

# We enforce our own pixel limit (settings.MAX_IMAGE_PIXELS) before decoding; PIL's global one would only warn.
Image.MAX_IMAGE_PIXELS = None
# What Pillow warns of while opening a client's bytes (a corrupt EXIF block, an odd TIFF tag) is the client's
# business: the image opens or it is a 400. Filtered once here, not per image with catch_warnings, which costs 2 µs
# and swaps the process's filter list under the other inference threads.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

# The formats decoded, and no others: every further decoder Pillow has (PPM, TGA, PCX, ICO, JPEG 2000, EPS via
# Ghostscript, ...) is attack surface. Pillow's format name → (media types, file suffixes). The server's accepted
# Content-Types, the training data reader, the OpenAPI document and the web page all derive from this table.
IMAGE_FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "JPEG": (("image/jpeg", "image/jpg"), (".jpg", ".jpeg")),
    "PNG": (("image/png",), (".png",)),
    "WEBP": (("image/webp",), (".webp",)),
    "BMP": (("image/bmp", "image/x-ms-bmp"), (".bmp",)),
    "GIF": (("image/gif",), (".gif",)),
    "TIFF": (("image/tiff",), (".tif", ".tiff")),
}
IMAGE_MEDIA_TYPES = frozenset(t for types, _ in IMAGE_FORMATS.values() for t in types)
IMAGE_SUFFIXES = frozenset(s for _, suffixes in IMAGE_FORMATS.values() for s in suffixes)
IMAGE_FORMATS_OPENED = tuple(IMAGE_FORMATS)
_NAMES = [{"WEBP": "WebP"}.get(name, name) for name in IMAGE_FORMATS]  # as people write them
FORMAT_NAMES = f"{', '.join(_NAMES[:-1])} or {_NAMES[-1]}"  # "JPEG, PNG, WebP, BMP, GIF or TIFF"

RESIZE_RULE = "centre-crop to the input aspect ratio, then bilinear resize (JPEG decoded at >= 2x the input size)"
# Draft-mode decoding keeps at least this many times the input size so the bilinear downscale still antialiases.
_DRAFT_OVERSAMPLE = 2
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


Positive = Annotated[float, Field(gt=0)]


class InputSpec(BaseModel):
    """What a model expects of an image: its size, scale and normalisation, and the resize rule. The one type for
    it: training writes it to metadata.json under ``input.preprocessing``, service/metadata.py validates it there,
    and service/preprocessing.py follows it. Fields a newer exporter may add are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    mean: tuple[float, float, float]
    std: tuple[Positive, Positive, Positive]
    scale: Positive = 1.0 / 255.0
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    resize: str = RESIZE_RULE
    alpha_background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_metadata(cls, spec: dict) -> InputSpec:
        """From metadata.json's (or GET /v1/models/{name}'s) ``input.preprocessing``; ValidationError if unfit."""
        return cls.model_validate(spec)

    def to_metadata(self) -> dict:
        return self.model_dump(mode="json")


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open image bytes lazily (header only) and enforce the pixel limit before any decoding happens."""
    if not data:
        raise InvalidImage("The image is empty (0 bytes).")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS_OPENED)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"The data is not a readable image. Send {FORMAT_NAMES} bytes.") from exc
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}. "
            "Downscale it before sending."
        )
    return image


def decode(data: bytes, spec: InputSpec, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes → uint8 array of shape (height, width, 3), RGB, exactly as the network will see it."""
    return decode_opened(open_for(data, spec, max_pixels), spec)


def open_for(data: bytes, spec: InputSpec, max_pixels: int | None = None,
             opened: Image.Image | None = None) -> Image.Image:
    """Open (header only) and set JPEG's reduced-scale decoding: ``decoded_bytes`` then says what decoding costs.
    ``opened``: these bytes as ``open_image(data, max_pixels)`` already opened them, not yet decoded."""
    image = opened if opened is not None else open_image(data, max_pixels)
    try:
        _draft(image, spec)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"The image could not be decoded ({exc}). It may be truncated or corrupt.") from exc
    return image


def decoded_bytes(image: Image.Image) -> int:
    """Bytes the decoded first frame will take, from the header alone (after any reduced-scale decoding)."""
    width, height = image.size
    sample = 4 if image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
    return width * height * len(image.getbands()) * sample


def decode_opened(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """An opened image → (height, width, 3) uint8. Cropped and resized in its own mode first, so the full-size
    picture is never converted: a 40-megapixel 16-bit or RGBA image costs its decoded size once, not four times."""
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP/TIFF: the first frame
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "1"):
            image = image.convert("RGBA" if image.mode == "P" else "L")  # palettes and bits don't interpolate
        box = _crop_box(image.size, spec.width / spec.height)
        if image.size != (spec.width, spec.height) or box != (0, 0, *image.size):
            image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR, box=box)
        return np.asarray(_to_rgb(image, spec.alpha_background), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"The image could not be decoded ({exc}). It may be truncated or corrupt.") from exc


def normalize(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) or (H, W, 3) → float32 (N, 3, H, W) / (3, H, W): scale, subtract mean, divide by std."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    scaled = images.astype(np.float32) * np.float32(spec.scale)
    normalized = (scaled - mean) / std
    return np.ascontiguousarray(np.moveaxis(normalized, -1, -3))


def preprocess(data: bytes, spec: InputSpec, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes → float32 (3, H, W) model input."""
    return normalize(decode(data, spec, max_pixels), spec)


def _draft(image: Image.Image, spec: InputSpec) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side stays >= 2x the input's."""
    if image.format != "JPEG":
        return
    width, height = image.size
    needed = _DRAFT_OVERSAMPLE * max(spec.width, spec.height)
    short_side = min(width, height)
    if short_side <= needed:
        return
    factor = needed / short_side
    image.draft(image.mode, (max(1, round(width * factor)), max(1, round(height * factor))))


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale: keep the top 8 bits (PIL's convert("RGB") would clip everything above 255 to white).
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((wide // 257).clip(0, 255).astype(np.uint8))
    elif mode == "F":
        image = Image.fromarray(np.asarray(image, dtype=np.float32).clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(canvas, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _crop_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """The centred box of the given aspect ratio (width / height) inside an image of ``size``."""
    width, height = size
    if abs(width / height - aspect) < 1e-6:
        return (0, 0, width, height)
    if width / height > aspect:
        new_width = max(1, round(height * aspect))
        left = (width - new_width) // 2
        return (left, 0, left + new_width, height)
    new_height = max(1, round(width / aspect))
    top = (height - new_height) // 2
    return (0, top, width, top + new_height)
