"""The one grid renderer (bss_model/viz.py) on tiny arrays: where every tile lands, and its three users."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bss_model.viz import COLUMNS, save_separation_png, separation_grid, tile_grid, titled_grid


def test_tile_grid_places_every_tile_with_gutters_and_scale():
    a, b = np.full((2, 2), 1, np.uint8), np.full((1, 3), 2, np.uint8)
    grid = tile_grid([[a, a], [b]], gap=1, fill=9, top=2, scale=2)
    # columns as wide as the widest tile (3 x 2 = 6), rows as tall as their tallest (4, then 2)
    assert grid.shape == (2 + 4 + 2 + 3 * 1, 2 * 6 + 3 * 1)
    assert grid.dtype == np.uint8
    assert (grid[3:7, 1:5] == 1).all() and (grid[3:7, 8:12] == 1).all()  # row 0, both tiles, upscaled 2x
    assert (grid[8:10, 1:7] == 2).all()  # row 1: the 1x3 tile as 2x6
    assert (grid[:3] == 9).all() and (grid[7] == 9).all() and (grid[3:7, 5:8] == 9).all()  # margins and gutters


def test_separation_grid_is_five_columns_of_clipped_tiles_on_white():
    x = np.full((2, 1, 3, 3), 0.5, np.float32)
    target = np.zeros((2, 2, 3, 3), np.float32)
    pred = np.full((2, 2, 3, 3), 2.0, np.float32)  # clipped to 1
    grid = separation_grid(x, target, pred, pad=2)
    assert grid.shape == (2 * 5 + 2, 5 * 5 + 2) and grid.dtype == np.float32
    assert (grid[2:5, 2:5] == 0.5).all()  # mixture
    assert (grid[2:5, 7:10] == 0).all()  # true digit
    assert (grid[2:5, 17:20] == 1).all()  # pred digit, clipped
    assert (grid[:2] == 1).all()  # white gutter


def test_titled_grid_and_the_reports_picture(tmp_path: Path):
    from PIL import Image

    rows = [[np.zeros((4, 4)), np.ones((4, 4))]]
    pixels = titled_grid(rows, ("a", "b"), gap=2, header=16, scale=2)
    assert pixels.shape == (16 + 8 + 2 * 2, 2 * 8 + 3 * 2)
    assert (pixels[18:26, 2:10] == 0).all() and (pixels[18:26, 12:20] == 255).all()
    assert (pixels[:16] != 128).any()  # the titles are drawn in the header
    x = np.zeros((3, 1, 32, 32), np.float32)
    save_separation_png(x, np.zeros((3, 2, 32, 32), np.float32), np.zeros((3, 2, 32, 32), np.float32),
                        tmp_path / "s.png", title="t")  # fmt: skip
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (len(COLUMNS) * 96 + 6 * 4, 2 * 16 + 3 * 96 + 4 * 4)
