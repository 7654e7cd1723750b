"""A dependency-free renderer for the layer-by-expert load heatmap (an ``(H, W, 3)`` uint8 image).

Rows are MoE layers, columns are experts. The colour is the expert's load relative to a perfectly balanced
layer on a diverging scale: dark blue is a starving or dead expert (0x), white is balanced (1x) and dark red
is overloaded (``vmax`` times the balanced load or more). A colour bar with the same scale runs along the
bottom, with tick marks at 0x, 1x and ``vmax``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

# Diverging blue-white-red anchors (value in [0, 1] on the relative-load scale -> RGB).
_ANCHORS = np.array(
    [
        [0.00, 5, 48, 97],
        [0.25, 67, 147, 195],
        [0.50, 247, 247, 247],
        [0.75, 214, 96, 77],
        [1.00, 103, 0, 31],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` (clipped) to RGB uint8 colours of shape ``values.shape + (3,)``."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(values, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def load_heatmap(load_LE: np.ndarray, cell: int = 24, vmax: float = 2.0) -> np.ndarray:
    """Render per-layer expert loads as an ``(H, W, 3)`` uint8 image.

    Args:
        load_LE: ``(L, E)`` share of each layer's token copies that each expert received (rows sum to 1;
            a row of zeros is drawn as balanced). NaN marks no expert (a layer with fewer than ``E``), drawn
            as grid grey.
        cell: Side of one layer-expert cell in pixels.
        vmax: Load, relative to balanced, drawn in the darkest red.

    Returns:
        The image: ``L`` rows and ``E`` columns of cells with 1-pixel grey grid lines, then a colour bar.

    Raises:
        ValueError: If ``load_LE`` is not 2-D, or ``cell`` or ``vmax`` is out of range.
    """
    load_LE = np.asarray(load_LE, dtype=np.float64)
    if load_LE.ndim != 2 or load_LE.size == 0:
        raise ValueError(f"load_LE.shape={load_LE.shape} is invalid: expected a non-empty (layers, experts) array")
    if isinstance(cell, bool) or not isinstance(cell, Integral) or cell < 2:
        raise ValueError(f"cell={cell!r} is invalid: must be an int >= 2")
    if isinstance(vmax, bool) or not isinstance(vmax, Real) or not 1.0 < vmax < math.inf:
        raise ValueError(f"vmax={vmax!r} is invalid: must be a finite number > 1")
    num_layers, num_experts = load_LE.shape
    present_LE = ~np.isnan(load_LE)  # NaN: past the experts of a layer with fewer
    load_LE = np.where(present_LE, load_LE, 0.0)
    experts_L1 = present_LE.sum(axis=1, keepdims=True)
    totals = load_LE.sum(axis=1, keepdims=True)
    relative_LE = np.where(totals > 0, load_LE * experts_L1 / np.where(totals > 0, totals, 1.0), 1.0)
    # Piecewise-linear scale: 0 -> 0, 1 (balanced) -> 0.5, vmax -> 1.
    scaled_LE = np.where(relative_LE <= 1.0, relative_LE / 2, 0.5 + (relative_LE - 1.0) / (vmax - 1.0) / 2)
    grid = (128, 128, 128)
    height, width = num_layers * cell + 1, num_experts * cell + 1
    bar = max(6, cell // 2)
    image = np.full((height + 2 + bar + 4, width, 3), 255, dtype=np.uint8)
    image[:height] = grid
    colours = colormap(scaled_LE)
    for layer in range(num_layers):
        for expert in range(num_experts):
            top, left = layer * cell + 1, expert * cell + 1
            if present_LE[layer, expert]:
                image[top : top + cell - 1, left : left + cell - 1] = colours[layer, expert]
    # Colour bar: the same scale left to right, ticks at 0x, 1x (middle) and vmax.
    ramp = colormap(np.linspace(0.0, 1.0, width))
    image[height + 2 : height + 2 + bar] = ramp[None, :, :]
    for x in (0, width // 2, width - 1):
        image[height + 2 + bar : height + 2 + bar + 4, max(0, x - 0) : x + 1] = grid
    return image


def write_png(image: np.ndarray, path: str) -> None:
    """Save an ``(H, W, 3)`` uint8 image as PNG (Pillow ships with TensorBoard)."""
    from PIL import Image

    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(path)
