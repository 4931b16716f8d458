"""What every figure module shares: reading the table a plot is drawn from, and writing the PDF.

The PDF carries no creation date and names the table it was drawn from with the table's sha256,
so the same table always gives the same file, and a PDF says which data it shows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saeflow import h5io


def read_table(path: str, columns: Sequence[str]) -> pd.DataFrame:
    """The CSV behind a plot; an error names the file and the missing columns."""
    table = pd.read_csv(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise h5io.InputFileError(f"{path}: columns {missing} missing; found {list(table)}")
    return table


def save_pdf(draw: Callable[[Figure], None], table_path: str, out: str, width: float,
             height: float, font_size: float) -> Path:
    """Draw onto a fresh Agg figure with ``draw(fig)`` and write ``out`` atomically."""
    digest = hashlib.sha256(Path(table_path).read_bytes()).hexdigest()
    with matplotlib.rc_context({"font.size": font_size, "pdf.fonttype": 42}):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        with h5io.atomic_path(out) as tmp:
            fig.savefig(tmp, format="pdf", metadata={
                "Creator": "saeflow", "CreationDate": None,
                "Subject": f"drawn from {Path(table_path).name} sha256:{digest}"})
    return Path(out)
