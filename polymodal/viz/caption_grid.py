"""Captioning result grid (PNG): one row per image, the thumbnail beside its generated caption
and, when known, its reference captions. matplotlib with the Agg backend, so it runs headless."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from .retrieval_grid import _save, _thumb


def caption_grid(images: Sequence, generated: Sequence[str], out: str | Path,
                 references: Sequence[Sequence[str]] | None = None, notes: Sequence[str] | None = None,
                 max_references: int = 5) -> Path:
    """Writes the grid to ``out`` and returns its path.

    Args:
        images: image paths or PIL images.
        generated: one generated caption per image (bold).
        out: the PNG file (folders are created).
        references: per image, its reference captions (grey), or None.
        notes: per image, a short line under the caption (e.g. its CIDEr), or None.
        max_references: show at most this many references per image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0 or len(generated) != n:
        raise ValueError(f"caption_grid needs one caption per image, got {n} images and {len(generated)} captions")
    if references is not None and len(references) != n:
        raise ValueError(f"{len(references)} reference lists for {n} images")
    refs = [list(r)[:max_references] for r in references] if references is not None else [[] for _ in range(n)]
    height = [1.9 + 0.22 * max(0, len(r) - 3) for r in refs]
    fig, axes = plt.subplots(n, 2, figsize=(9.5, sum(height)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3], "height_ratios": height})
    for r in range(n):
        axes[r][0].imshow(_thumb(images[r]))
        axes[r][0].axis("off")
        ax = axes[r][1]
        ax.axis("off")
        ax.text(0.0, 0.98, "\n".join(textwrap.wrap(generated[r] or "(empty)", 62)), va="top", ha="left",
                fontsize=10, fontweight="bold", transform=ax.transAxes)
        lines = []
        if notes is not None and notes[r]:
            lines.append(notes[r])
        lines += ["- " + textwrap.shorten(c, 80) for c in refs[r]]
        if lines:
            ax.text(0.0, 0.62, "\n".join(lines), va="top", ha="left", fontsize=8, color="dimgray",
                    transform=ax.transAxes)
    return _save(fig, out)
