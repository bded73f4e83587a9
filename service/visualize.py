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


def tile_grid(tiles: np.ndarray) -> tuple[np.ndarray, dict]:
    """(count, H, W, 1 or 3) uint8 tiles → one RGB picture of them, row-major in a near-square grid, GRID_GAP apart
    on GAP_COLOUR; and its layout as the API describes it."""
    count, height, width = tiles.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.empty((rows * (height + GRID_GAP) - GRID_GAP, columns * (width + GRID_GAP) - GRID_GAP, 3), np.uint8)
    grid[:] = GAP_COLOUR
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + GRID_GAP), (index % columns) * (width + GRID_GAP)
        grid[top:top + height, left:left + width] = tile
    return grid, {"rows": rows, "columns": columns, "tile": [height, width], "gap": GRID_GAP}


def feature_grid(maps: np.ndarray) -> dict:
    """(C, H, W) → one PNG of all channels as grey tiles, scaled from one shared value range."""
    low, high = float(maps.min()), float(maps.max())
    grid, layout = tile_grid(to_uint8(maps, low, high)[..., None])
    return {"png": png_data_url(grid), "range": [low, high], **layout}


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
    limit = float(np.abs(weights).max()) or 1.0
    tiles = to_uint8(weights, -limit, limit)
    tiles = np.moveaxis(tiles, 1, -1) if weights.shape[1] == 3 else tiles.mean(1).astype(np.uint8)[..., None]
    grid, layout = tile_grid(tiles)
    return {"png": png_data_url(grid), "range": [-limit, limit], **layout}
