"""Pictures of separations: a pure grid builder (TensorBoard) and a matplotlib figure (reports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = ("mixture", "true digit", "true fashion", "pred digit", "pred fashion")


def separation_grid(x: np.ndarray, target: np.ndarray, pred: np.ndarray, pad: int = 2) -> np.ndarray:
    """Rows of ``mixture | true digit | true fashion | pred digit | pred fashion`` as one float [H, W] image in [0, 1].

    x: [N,1,H,W]; target, pred: [N,2,H,W]. A white ``pad``-pixel gutter separates tiles.
    """
    tiles = np.concatenate([x, target, np.clip(pred, 0, 1)], axis=1)  # [N, 5, H, W]
    n, c, h, w = tiles.shape
    grid = np.ones((n * (h + pad) + pad, c * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top : top + h, left : left + w] = tiles[i, j]
    return grid


def save_separation_png(x: np.ndarray, target: np.ndarray, pred: np.ndarray, path: Path, title: str = "") -> None:
    """A labelled figure of the grid, written atomically as PNG."""
    import io

    from matplotlib.figure import Figure

    from bss_model.io import atomic_write_bytes

    n = len(x)
    # A Figure without pyplot: no backend to choose (process-wide) and no global figure list; PNG renders with Agg.
    fig = Figure(figsize=(len(COLUMNS) * 1.4, n * 1.4 + 0.4))
    axes = fig.subplots(n, len(COLUMNS), squeeze=False)
    tiles = np.concatenate([x, target, np.clip(pred, 0, 1)], axis=1)
    for i in range(n):
        for j, name in enumerate(COLUMNS):
            ax = axes[i][j]
            ax.imshow(tiles[i, j], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(Path(path), buf.getvalue())
