"""The one preprocessing module: formats, colour modes, orientation, sizes, limits and the normalisation formula."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.preprocessing import InputSpec, decode, normalize, preprocess
from tests.helpers import encode, image_bytes, pattern

SPEC = InputSpec(height=32, width=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_decodes_to_the_input_size(fmt):
    array = decode(image_bytes(fmt, 80, 60), SPEC)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "1", "F"])
def test_colour_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "F" else "PNG"
    array = decode(encode(pattern(40, 40), fmt, mode), SPEC)
    assert array.shape == (32, 32, 3)
    assert array.std() > 0  # not a flat image: the content survived the conversion


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_greyscale_keeps_its_range(fmt):
    wide = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    image = Image.fromarray(wide)  # uint16 → mode I;16
    array = decode(encode(image, fmt), SPEC)
    assert array[..., 0].min() == 0 and array[..., 0].max() == 255  # no clipping to white
    assert np.all(array[..., 0] == array[..., 1])


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    array = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), SPEC)
    assert np.all(array == 255)


def test_exif_orientation_is_honoured():
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red, right half blue, stored landscape
    pixels[:, 32:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated = decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95), SPEC)
    plain = decode(encode(image, "JPEG", quality=95), SPEC)
    # Displayed upright the image is portrait: red on top, blue at the bottom (after the centre crop).
    assert rotated[4, 16, 0] > 200 and rotated[28, 16, 2] > 200
    assert not np.array_equal(rotated, plain)


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (32, 32), (1920, 1080), (1080, 1920)])
def test_any_size_is_accepted(size):
    assert decode(image_bytes("PNG", *size), SPEC).shape == (32, 32, 3)


def test_an_image_at_the_input_size_is_not_resampled():
    pixels = pattern(32, 32)
    assert np.array_equal(decode(encode(pixels, "PNG"), SPEC), pixels)


def test_centre_crop_keeps_the_middle_of_wide_images():
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:, 32:64] = 200  # only the middle third is bright
    assert decode(encode(pixels, "PNG"), SPEC).min() == 200


def test_large_jpegs_decode_at_reduced_scale_and_look_the_same():
    big = np.asarray(Image.fromarray(pattern(64, 36, seed=3)).resize((1920, 1080), Image.Resampling.BICUBIC))
    data = encode(big, "JPEG", quality=92)
    fast = decode(data, SPEC).astype(np.float32)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((420, 0, 1500, 1080))
                      .resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(fast - full).mean() < 4.0  # draft mode changes little at 32×32


def test_pixel_limit_rejects_decompression_bombs_before_decoding():
    data = image_bytes("PNG", 300, 300)
    with pytest.raises(ImageTooLarge, match="90000 pixels; the limit is 50000"):
        decode(data, SPEC, max_pixels=50_000)
    assert decode(data, SPEC, max_pixels=90_000).shape == (32, 32, 3)


@pytest.mark.parametrize("data", [b"", b"not an image", image_bytes("PNG")[:60], b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_data_raises_invalid_image(data):
    with pytest.raises(InvalidImage):
        decode(data, SPEC)


def test_normalize_is_scale_then_mean_and_std_in_nchw():
    pixels = pattern(32, 32)
    out = normalize(pixels[None], SPEC)
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    expected = (pixels[4, 7, 1] / 255.0 - SPEC.mean[1]) / SPEC.std[1]
    assert out[0, 1, 4, 7] == pytest.approx(expected, abs=1e-6)
    assert np.array_equal(preprocess(encode(pixels, "PNG"), SPEC), out[0])


def test_spec_round_trips_through_metadata():
    assert InputSpec.from_metadata(SPEC.to_metadata()) == SPEC
