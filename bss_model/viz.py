"""Pictures of separations, from one grid renderer: :func:`tile_grid` lays tiles out, :func:`titled_grid`
puts column titles above them. TensorBoard's grid, the report's ``separations.png`` and ``bss-separate``'s
``panel.png`` are all drawn by these two."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COLUMNS = ("mixture", "true digit", "true fashion", "pred digit", "pred fashion")
REPORT_TILE_SCALE = 3  # 32x32 tiles drawn 96x96 in the report's picture


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit pixels, rounded to nearest."""
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def tile_grid(rows: Sequence[Sequence[np.ndarray]], gap: int, fill: float, top: int = 0, scale: int = 1) -> np.ndarray:
    """Tiles ([H, W] each) in rows, as one [H, W] image of the tiles' dtype.

    Every column is as wide as the widest tile and every row as tall as its tallest, tiles left-aligned;
    ``gap``-pixel gutters of ``fill`` around and between them, ``top`` extra pixels above (for titles).
    ``scale`` upscales each tile by pixel repetition, so pixels stay crisp.
    """
    col_w = scale * max(t.shape[1] for row in rows for t in row)
    heights = [scale * max(t.shape[0] for t in row) for row in rows]
    n_cols = max(len(row) for row in rows)
    canvas = np.full(
        (top + sum(heights) + (len(rows) + 1) * gap, n_cols * col_w + (n_cols + 1) * gap), fill, dtype=rows[0][0].dtype
    )
    y = top + gap
    for row, h in zip(rows, heights, strict=True):
        for j, tile in enumerate(row):
            big = np.kron(tile, np.ones((scale, scale), dtype=tile.dtype)) if scale > 1 else tile
            x = gap + j * (col_w + gap)
            canvas[y : y + big.shape[0], x : x + big.shape[1]] = big
        y += h + gap
    return canvas


def titled_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    gap: int = 4,
    header: int = 16,
    scale: int = 1,
    title: str = "",
) -> np.ndarray:
    """:func:`tile_grid` of [0, 1] tiles as uint8 on mid-gray gutters (black image borders stay visible),
    with each column's title above it and an optional ``title`` line above those."""
    from PIL import Image, ImageDraw, ImageFont

    top = header * (2 if title else 1)
    canvas = tile_grid([[to_uint8(t) for t in row] for row in rows], gap, 128, top=top, scale=scale)
    im = Image.fromarray(canvas, mode="L")
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=11)  # FreeType's; without FreeType, Pillow's fixed bitmap font
    except (ImportError, OSError):
        font = ImageFont.load_default()
    col_w = scale * max(t.shape[1] for row in rows for t in row)
    if title:
        draw.text((gap, 2), title, fill=255, font=font)
    for j, name in enumerate(titles):
        draw.text((gap + j * (col_w + gap), top - header + 2), name, fill=255, font=font)
    return np.asarray(im)


def separation_rows(x: np.ndarray, target: np.ndarray, pred: np.ndarray) -> list[list[np.ndarray]]:
    """Rows of ``mixture | true digit | true fashion | pred digit | pred fashion`` tiles (predictions clipped
    to [0, 1]). x: [N,1,H,W]; target, pred: [N,2,H,W]."""
    tiles = np.concatenate([x, target, np.clip(pred, 0, 1)], axis=1)  # [N, 5, H, W]
    return [list(row) for row in tiles]


def separation_grid(x: np.ndarray, target: np.ndarray, pred: np.ndarray, pad: int = 2) -> np.ndarray:
    """The rows of :func:`separation_rows` as one float [H, W] image in [0, 1] (TensorBoard); white
    ``pad``-pixel gutters."""
    rows = [[t.astype(np.float32) for t in row] for row in separation_rows(x, target, pred)]
    return tile_grid(rows, pad, 1.0)


def save_separation_png(x: np.ndarray, target: np.ndarray, pred: np.ndarray, path: Path, title: str = "") -> None:
    """The rows of :func:`separation_rows` with their column titles, written atomically as PNG."""
    from PIL import Image

    from bss_model.io import atomic_write_bytes

    pixels = titled_grid(separation_rows(x, target, pred), COLUMNS, scale=REPORT_TILE_SCALE, title=title)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
