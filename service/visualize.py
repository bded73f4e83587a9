"""Arrays → PNG images for the "what the network sees" view. numpy + Pillow only."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image

from service.preprocessing import InputSpec

GRID_GAP = 1  # pixels between tiles in a feature-map grid
GAP_COLOUR = (70, 110, 200)  # a blue no greyscale value can be mistaken for
OVERLAY_SIZE = 128  # side of the class activation map overlay


def png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = 255.0 / (high - low) if high > low else 0.0
    return ((values - low) * scale).clip(0, 255).astype(np.uint8)


def feature_grid(maps: np.ndarray) -> dict:
    """(C, H, W) → one PNG of all channels as grey tiles, row-major, scaled from one shared value range."""
    channels, height, width = maps.shape
    columns = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / columns)
    low, high = float(maps.min()), float(maps.max())
    grid = np.empty((rows * (height + GRID_GAP) - GRID_GAP, columns * (width + GRID_GAP) - GRID_GAP, 3), np.uint8)
    grid[:] = GAP_COLOUR
    scaled = to_uint8(maps, low, high)[..., None]
    for channel in range(channels):
        top, left = (channel // columns) * (height + GRID_GAP), (channel % columns) * (width + GRID_GAP)
        grid[top:top + height, left:left + width] = scaled[channel]
    return {"png": png_data_url(grid), "range": [low, high], "rows": rows, "columns": columns,
            "tile": [height, width], "gap": GRID_GAP}


def input_image(tensor: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Undo normalisation: (3, H, W) float → (H, W, 3) uint8, the image exactly as the network received it."""
    std = np.asarray(spec.std, np.float32)[:, None, None]
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    pixels = (tensor * std + mean) / spec.scale
    return np.moveaxis(pixels, 0, -1).round().clip(0, 255).astype(np.uint8)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] → RGB, black → red → yellow → white (the 'hot' colour map)."""
    return (np.stack([values * 3, values * 3 - 1, values * 3 - 2], axis=-1).clip(0, 1) * 255).astype(np.uint8)


def cam_overlay(class_map: np.ndarray, image: np.ndarray) -> dict:
    """Class activation map (h, w) → heat map blended over the input, both upscaled to OVERLAY_SIZE."""
    low, high = float(class_map.min()), float(class_map.max())
    normalized = (class_map - low) / (high - low) if high > low else np.zeros_like(class_map)
    heat = Image.fromarray((normalized * 255).astype(np.uint8)).resize((OVERLAY_SIZE, OVERLAY_SIZE),
                                                                        Image.Resampling.BILINEAR)
    heat_rgb = heat_colours(np.asarray(heat, np.float32) / 255.0)
    base = np.asarray(Image.fromarray(image).resize((OVERLAY_SIZE, OVERLAY_SIZE), Image.Resampling.BILINEAR))
    blended = (0.45 * base.astype(np.float32) + 0.55 * heat_rgb.astype(np.float32)).astype(np.uint8)
    return {"png": png_data_url(blended), "heatmap_png": png_data_url(heat_rgb), "range": [low, high],
            "shape": list(class_map.shape)}


def filter_grid(weights: np.ndarray) -> dict:
    """(out, in, kh, kw) → the filters as RGB tiles (3 input channels) or greyscale, one shared symmetric range."""
    out_channels, in_channels, height, width = weights.shape
    limit = float(np.abs(weights).max()) or 1.0
    columns = math.ceil(math.sqrt(out_channels))
    rows = math.ceil(out_channels / columns)
    colour = in_channels == 3
    shape = (rows * (height + GRID_GAP) - GRID_GAP, columns * (width + GRID_GAP) - GRID_GAP)
    grid = np.empty((*shape, 3), np.uint8)
    grid[:] = GAP_COLOUR
    tiles = to_uint8(weights, -limit, limit)
    for index in range(out_channels):
        top, left = (index // columns) * (height + GRID_GAP), (index % columns) * (width + GRID_GAP)
        tile = np.moveaxis(tiles[index], 0, -1) if colour else tiles[index].mean(0).astype(np.uint8)[..., None]
        grid[top:top + height, left:left + width] = tile
    return {"png": png_data_url(grid), "range": [-limit, limit], "rows": rows, "columns": columns,
            "tile": [height, width], "gap": GRID_GAP}
