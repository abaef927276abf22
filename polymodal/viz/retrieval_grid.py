"""Retrieval result grids (PNG): text -> image rows of top-k thumbnails, and image -> text
rows of a query image beside its top-k captions. matplotlib with the Agg backend, so
it runs headless."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image


def _thumb(im, size: int = 160) -> Image.Image:
    if not isinstance(im, Image.Image):
        from ..data.images import load_image

        im = load_image(im)
    im = im.copy()
    im.thumbnail((size, size))
    return im


def text_to_image_grid(queries: Sequence[str], images: Sequence, top_idx: Sequence[Sequence[int]],
                       top_scores: Sequence[Sequence[float]], out: str | Path,
                       correct: Sequence[Sequence[bool]] | None = None) -> Path:
    """One row per text query: the query, then its top-k images with their scores
    (green frame = a ground-truth match, when ``correct`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(r) for r in top_idx)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(2.2 * (k + 1), 2.3 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        ax = axes[r][0]
        ax.axis("off")
        ax.text(0.0, 0.5, "\n".join(textwrap.wrap(q, 22)), va="center", ha="left", fontsize=9, wrap=True)
        for c in range(k):
            ax = axes[r][c + 1]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(top_idx[r]):
                ax.axis("off")
                continue
            ax.imshow(_thumb(images[top_idx[r][c]]))
            ax.set_title(f"#{c + 1}  {top_scores[r][c]:.3f}", fontsize=8)
            if correct is not None:
                for s in ax.spines.values():
                    s.set_edgecolor("green" if correct[r][c] else "lightgray")
                    s.set_linewidth(3 if correct[r][c] else 1)
    return _save(fig, out)


def image_to_text_grid(query_images: Sequence, texts: Sequence[str], top_idx: Sequence[Sequence[int]],
                       top_scores: Sequence[Sequence[float]], out: str | Path,
                       correct: Sequence[Sequence[bool]] | None = None) -> Path:
    """One row per image query: the image, then its top-k captions with their scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(query_images)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.4 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 3]})
    for r, im in enumerate(query_images):
        axes[r][0].imshow(_thumb(im))
        axes[r][0].axis("off")
        lines = []
        for c, (j, s) in enumerate(zip(top_idx[r], top_scores[r])):
            mark = " *" if correct is not None and correct[r][c] else ""
            lines.append(f"#{c + 1} ({s:.3f}){mark} " + textwrap.shorten(texts[j], 70))
        axes[r][1].axis("off")
        axes[r][1].text(0.0, 0.5, "\n".join(lines), va="center", ha="left", fontsize=8, family="monospace")
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    """Writes the figure as a PNG (creating the folder) and frees it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
