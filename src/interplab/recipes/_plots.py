"""Figure pieces shared by recipes."""

from __future__ import annotations

from typing import Any


def annotate_heads(ax: Any, grid: Any, span: float) -> None:
    """Write each cell's value on a [layer, head] heatmap (small grids only: <= 64 cells)."""
    n_layers, n_heads = grid.shape
    if n_layers * n_heads > 64:
        return
    for layer in range(n_layers):
        for head in range(n_heads):
            v = float(grid[layer, head])
            colour = "white" if abs(v) > 0.6 * span else "black"
            ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color=colour)
