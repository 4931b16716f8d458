"""Stage: draw a Dark Matter figure from its table (``tables/figureN.csv`` -> ``plots/figureN.pdf``).

``python -m saeflow.figures.dark_matter --figure N --table tables/figureN.csv
--out plots/figureN.pdf [--width 6] [--height 3.5] [--log-x | --no-log-x] [--log-y | --no-log-y]
[--cmap viridis] [--font-size 8]``

Every number drawn comes from the table (written by :mod:`saeflow.dark_matter.scaling`, which
also documents what each figure shows); nothing is fitted or interpolated here. The PDF's
``Subject`` names the table and its SHA-256, and it carries no creation date, so the same table
and options give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from saeflow import h5io

BAND_COLORS = [matplotlib.colormaps["viridis"](i / 7) for i in (7, 5, 3, 1)]
BANDS = [  # bottom to top, as the original stacks them
    ("nonlinear_error", "Nonlinear error"),
    ("encoder_error", "Encoder error"),
    ("linear_error", "Linear error"),
    ("absent_features", "Absent features"),
]


@dataclass(frozen=True)
class PlotOptions:
    """Plotting options; each figure reads the ones that apply to it."""

    width: float = 6.0
    """Figure width in inches."""
    height: float = 3.5
    """Figure height in inches."""
    log_x: bool = True
    """Logarithmic width axis (line plots)."""
    log_y: bool = False
    """Logarithmic FVU axis (line plots)."""
    cmap: str = "viridis"
    """Colour map (heat maps)."""
    font_size: float = 8.0
    """Base font size in points."""


def _check_columns(table: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise h5io.InputFileError(f"{source}: columns {missing} missing; found {list(table)}")


def draw_figure1(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Stacked bands of FVU vs width at the headline k, with the measured points."""
    ax = fig.add_subplot()
    curve = table.sort_values("width")
    widths = curve.width.to_numpy()
    lower = np.zeros(len(curve))
    for (column, label), color in zip(BANDS, BAND_COLORS):
        upper = lower + curve[column].to_numpy()
        value = curve.loc[curve.measured.astype(bool), column].iloc[-1]
        negative = upper < lower  # kept signed in the table; hatched here, not hidden
        ax.fill_between(widths, lower, upper, where=~negative, interpolate=True, color=color,
                        alpha=0.45, linewidth=0, label=f"{label} ({value:.3f} at widest SAE)")
        if negative.any():
            ax.fill_between(widths, lower, upper, where=negative, interpolate=True,
                            facecolor="none", edgecolor=color, hatch="////", linewidth=0,
                            label=f"{label} < 0 (hatched)")
        lower = upper
    total = curve.total_fvu.to_numpy()
    last = int((~curve.extrapolated.astype(bool)).to_numpy().nonzero()[0][-1])
    a, m, c = (float(curve[p].iloc[0]) for p in ("a", "m", "c"))
    ax.plot(widths[: last + 1], total[: last + 1], color="k", lw=1,
            label=f"FVU fit {c:.3f} + {a:.3g}·W$^{{-{m:.2f}}}$")
    ax.plot(widths[last:], total[last:], color="k", lw=1, ls=":")  # extrapolated
    points = curve[curve.measured.astype(bool)]
    for column, marker, label in [("fvu", "o", "SAE"), ("fvu_nonlinear", "s", "SAE + linear pred."),
                                  ("fvu_nonlinear_pursuit", "^", "pursuit + linear pred.")]:
        ax.plot(points.width, points[column], marker, color="k", ms=3.5, label=label)
    ax.axhline(c, color="0.3", lw=0.8, ls="--")
    _axes(ax, opts, "SAE width", "FVU", points.width.to_numpy())
    title = f"Decomposition of SAE error, k = {int(curve.k.iloc[0])}"
    note = curve.note.iloc[0] if "note" in curve and isinstance(curve.note.iloc[0], str) else ""
    ax.set_title(title + (f"\n({note})" if note else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def draw_figure2(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """FVU and nonlinear FVU vs width per k, with the power-law fit and the nonlinear mean."""
    ax = fig.add_subplot()
    ks = sorted(table.k.unique())
    colors = matplotlib.colormaps["viridis"](np.linspace(0.1, 0.8, len(ks)))
    for k, color in zip(ks, colors):
        rows = table[table.k == k]
        for quantity, marker, name in [("fvu", "o", "FVU"), ("fvu_nonlinear", "s", "nonlinear FVU")]:
            measured = rows[(rows.kind == "measured") & (rows.quantity == quantity)]
            ax.plot(measured.width, measured.value, marker, color=color, ms=4,
                    mfc=color if quantity == "fvu" else "none", label=f"{name}, k = {k}")
        for kind, style in [("fit", "-"), ("mean", "--")]:
            line = rows[rows.kind == kind].sort_values("width")
            ax.plot(line.width, line.value, style, color=color, lw=1)
    _axes(ax, opts, "SAE width", "FVU", table[table.kind == "measured"].width.to_numpy())
    ax.set_title("FVU (power-law fit, solid) and nonlinear FVU (mean, dashed)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _heatmap(fig: Figure, ax: Axes, table: pd.DataFrame, column: str, title: str,
             opts: PlotOptions) -> None:
    grid = table.pivot(index="k", columns="width", values=column).sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(values, origin="lower", aspect="auto", cmap=opts.cmap)
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(grid.shape[1]), [str(w) for w in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(k) for k in grid.index])
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(values):
        text = "n/a" if not np.isfinite(value) else f"{value:.3f}"
        ax.text(j, i, text, ha="center", va="center",
                color="white" if np.isfinite(value) and value < middle else "black")
    ax.set_xlabel("SAE width")
    ax.set_ylabel("k (L0)")
    ax.set_title(title)


def draw_figure3(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Held-out R² of predicting the error vector and its squared norm from x, width × k."""
    left, right = fig.subplots(1, 2)
    _heatmap(fig, left, table, "r2_error_vector", "R² predicting the error vector", opts)
    _heatmap(fig, right, table, "r2_error_norm", "R² predicting ‖error‖²", opts)


def draw_figure4(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Held-out nonlinear FVU over width × k."""
    _heatmap(fig, fig.add_subplot(), table, "fvu_nonlinear", "Nonlinear FVU (held out)", opts)


def _axes(ax: Axes, opts: PlotOptions, xlabel: str, ylabel: str, widths: np.ndarray) -> None:
    """Scales and labels; width ticks at the SAEs' widths (log minor ticks stay unlabelled)."""
    if opts.log_x:
        ax.set_xscale("log")
    if opts.log_y:
        ax.set_yscale("log")
    ticks = np.unique(widths)
    ax.set_xticks(ticks, [f"{w:g}" for w in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)


DRAW: dict[int, tuple[Callable[[Figure, pd.DataFrame, PlotOptions], None], list[str]]] = {
    1: (draw_figure1, ["width", "k", "measured", "extrapolated", "total_fvu", "a", "m", "c",
                       *[b for b, _ in BANDS], "fvu", "fvu_nonlinear", "fvu_nonlinear_pursuit"]),
    2: (draw_figure2, ["kind", "quantity", "k", "width", "value"]),
    3: (draw_figure3, ["width", "k", "r2_error_vector", "r2_error_norm"]),
    4: (draw_figure4, ["width", "k", "fvu_nonlinear"]),
}


def plot(figure: int, table_path: str, out: str, opts: PlotOptions) -> Path:
    """Draw figure ``figure`` from ``table_path`` into the PDF ``out`` (written atomically)."""
    draw, columns = DRAW[figure]
    table = pd.read_csv(table_path)
    _check_columns(table, columns, table_path)
    if table.empty:
        raise h5io.InputFileError(f"{table_path}: no rows")
    digest = hashlib.sha256(Path(table_path).read_bytes()).hexdigest()
    with matplotlib.rc_context({"font.size": opts.font_size, "pdf.fonttype": 42}):
        fig = Figure(figsize=(opts.width, opts.height), layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig, table, opts)
        with h5io.atomic_path(out) as tmp:
            fig.savefig(tmp, format="pdf", metadata={
                "Creator": "saeflow", "CreationDate": None,
                "Subject": f"drawn from {Path(table_path).name} sha256:{digest}"})
    return Path(out)


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, PlotOptions]:
    p = argparse.ArgumentParser(prog="python -m saeflow.figures.dark_matter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figure", type=int, required=True, choices=sorted(DRAW))
    p.add_argument("--table", required=True, help="the figure's table (.csv)")
    p.add_argument("--out", required=True, help="the figure (.pdf)")
    defaults = PlotOptions()
    p.add_argument("--width", type=float, default=defaults.width, help="inches")
    p.add_argument("--height", type=float, default=defaults.height, help="inches")
    p.add_argument("--log-x", action=argparse.BooleanOptionalAction, default=defaults.log_x)
    p.add_argument("--log-y", action=argparse.BooleanOptionalAction, default=defaults.log_y)
    p.add_argument("--cmap", default=defaults.cmap, help="matplotlib colour map (heat maps)")
    p.add_argument("--font-size", type=float, default=defaults.font_size, help="points")
    args = p.parse_args(argv)
    if args.cmap not in matplotlib.colormaps:
        p.error(f"--cmap {args.cmap!r} is not a matplotlib colour map")
    if min(args.width, args.height, args.font_size) <= 0:
        p.error("--width, --height and --font-size must be positive")
    opts = PlotOptions(args.width, args.height, args.log_x, args.log_y, args.cmap, args.font_size)
    return args, opts


def main(argv: Sequence[str] | None = None) -> None:
    args, opts = _parse_args(argv)
    plot(args.figure, args.table, args.out, opts)


if __name__ == "__main__":
    main()
