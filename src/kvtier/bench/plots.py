"""PNG plots, optional: matplotlib (the `bench` extra) is imported here only, when a plot is
drawn. Without it a benchmark still writes and prints its JSON and markdown, and one line on
stderr says which plots were skipped and what to install."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HINT = "plot skipped ({names}): matplotlib is not installed; pip install 'kvtier[bench]'"

Draw = Callable[[Any], Any]
"""Draws one figure with the pyplot module it is given and returns the figure."""


def pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figures: Mapping[Path, Draw]) -> list[Path]:
    """Draw each figure and save it as a PNG at its path; the paths written (none, and the
    hint on stderr, without matplotlib)."""
    if not figures:
        return []
    plt = pyplot()
    if plt is None:
        print(HINT.format(names=", ".join(p.name for p in figures)), file=sys.stderr)
        return []
    for path, draw in figures.items():
        fig = draw(plt)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return list(figures)
