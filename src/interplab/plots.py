"""Small shared figures (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor


def attention_patterns_figure(
    pattern: Float[Tensor, "head query key"],
    str_tokens: list[str],
    title: str = "",
    max_cols: int = 4,
) -> Any:
    """A grid of per-head attention heatmaps (rows = query position, columns = key position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_heads, n_pos = pattern.shape[0], pattern.shape[-1]
    cols = min(n_heads, max_cols)
    rows = -(-n_heads // cols)
    size = max(2.6, 0.22 * n_pos)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in str_tokens]
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= n_heads:
            ax.axis("off")
            continue
        ax.imshow(pattern[h].detach().float().cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(n_pos), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n_pos), labels, fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
