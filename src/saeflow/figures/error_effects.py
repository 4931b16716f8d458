"""Stage: draw Figures 9, 10b and 15 of the Dark Matter paper from their tables.

``python -m saeflow.figures.error_effects --figure 9|10b|15 --table tables/figureN.csv
--out plots/figureN.pdf [--width 7] [--height 3] [--log-x | --no-log-x] [--log-y | --no-log-y]
[--font-size 8]``

Figure 9 (``compare_ce_loss_combined.pdf``): % of the CE loss the SAE loses that Sae(x) + linear
error and Sae(x) + nonlinear error recover, against width (left) and L0 (right); table written by
:mod:`saeflow.dark_matter.downstream_ce`. Figure 10b (``predicting_from_recons.pdf``): R² of
predicting the SAE error and its parts from other sites' components; table written by
:mod:`saeflow.dark_matter.cross_site`. Figure 15 (``noise_effect_analysis.pdf``): FVU of the
reconstruction and of reconstruction + linear prediction against the percent of latents ablated,
per noise condition; table written by :mod:`saeflow.dark_matter.noise_simulation`.

As in :mod:`saeflow.figures.dark_matter`, every number comes from the table, the PDF's ``Subject``
names the table's SHA-256 and no creation date is stored, so a table gives the same bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from saeflow import cli, h5io
from saeflow.figures.pdf import read_table, save_pdf


@dataclass(frozen=True)
class PlotOptions:
    """Plotting options (the ``figures.figureN`` config entries); each figure reads its own."""

    width: float = 7.0
    """Figure width in inches."""
    height: float = 3.0
    """Figure height in inches."""
    log_x: bool = True
    """Logarithmic x axis (Figure 9's width and L0 axes)."""
    log_y: bool = False
    """Logarithmic FVU axis (Figure 15)."""
    font_size: float = 8.0
    """Base font size in points."""


R2_FLOOR = -1.0  # Figure 10b clips bars below this (R² of overfit fits), writing their value

SETTING_STYLE = {"sae_linear": ("Sae(x) + linear error", "tab:blue", "o"),
                 "sae_nonlinear": ("Sae(x) + nonlinear error", "tab:red", "s")}


def draw_figure9(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Two panels: % CE recovered vs width (at the headline L0) and vs L0 (at one width)."""
    axes = fig.subplots(1, 2, sharey=True)
    for ax, panel, xcol, xlabel in [(axes[0], "width", "width", "SAE width"),
                                    (axes[1], "k", "l0", "L0 (k)")]:
        rows = table.loc[table.panel == panel]
        for setting, (label, color, marker) in SETTING_STYLE.items():
            line = rows.loc[rows.setting == setting].sort_values(xcol)
            ax.plot(line[xcol], line.pct_recovered, marker=marker, color=color, ms=4, lw=1,
                    label=label)
        ax.axhline(0, color="0.4", lw=0.7)
        ax.axhline(100, color="0.4", lw=0.7, ls=":")
        if opts.log_x:
            ax.set_xscale("log")
        ticks = np.unique(rows[xcol].to_numpy())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.spines[["top", "right"]].set_visible(False)
        if len(rows) and panel == "width":
            ax.set_title(f"vs width (L0 ≈ {', '.join(f'{v:g}' for v in rows.l0.unique())})")
        elif len(rows):
            ax.set_title(f"vs L0 (width {int(rows.width.iloc[0])})")
    axes[0].set_ylabel("% of CE loss recovered")
    axes[1].legend(loc="best", fontsize="small", frameon=False)


def draw_figure15(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """FVU of Sae' and of Sae' + linear prediction vs % latents ablated, one colour per noise."""
    ax = fig.add_subplot()
    conditions = table[["act_noise", "rec_noise"]].drop_duplicates().to_numpy()
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(conditions)))
    for (act, rec), color in zip(conditions, colors):
        rows = table.loc[(table.act_noise == act) & (table.rec_noise == rec)].sort_values(
            "ablate_percent")
        name = f"act σ={act:g}, rec σ={rec:g}"
        ax.plot(rows.ablate_percent, rows.fvu_recon, "-o", color=color, ms=3, lw=1,
                label=f"{name}: reconstruction")
        ax.plot(rows.ablate_percent, rows.fvu_recon_linear, "--s", color=color, ms=3, lw=1,
                mfc="none", label=f"{name}: + linear prediction")
    if opts.log_y:
        ax.set_yscale("log")
    ax.set_xlabel("% of latents ablated (least frequent first)")
    ax.set_ylabel("FVU (held out)")
    ax.set_title("Synthetic noise: what linear prediction can and cannot recover")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def draw_figure10b(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Grouped bars: R² of each target from each (source site, component) predictor."""
    targets = list(dict.fromkeys(table.target))
    axes = np.atleast_1d(fig.subplots(1, len(targets), sharey=True))
    for ax, target in zip(axes, targets):
        rows = table[table.target == target]
        sources = list(dict.fromkeys(rows.source))
        predictors = list(dict.fromkeys(rows.predictor))
        width = 0.8 / len(predictors)
        colors = matplotlib.colormaps["tab10"](np.arange(len(predictors)))
        for i, (predictor, color) in enumerate(zip(predictors, colors)):
            part = rows.loc[rows.predictor == predictor].set_index("source").reindex(sources)
            xs = np.arange(len(sources)) + (i - (len(predictors) - 1) / 2) * width
            values = part.r2.to_numpy()
            ax.bar(xs, np.maximum(values, R2_FLOOR), width, color=color, label=predictor)
            for x, value in zip(xs, values):  # overfit fits: clipped, with the value written
                if value < R2_FLOOR:
                    ax.text(x, R2_FLOOR, f"{value:.1f}", rotation=90, ha="center", va="bottom",
                            fontsize="x-small", color="white")
        labels = [s.replace("blocks.", "L").replace(".hook_", " ") for s in sources]
        ax.set_xticks(range(len(sources)), labels, rotation=30, ha="right")
        ax.axhline(0, color="0.4", lw=0.7)
        ax.set_ylim(R2_FLOOR, 1.05)
        ax.set_title(f"target: {target}")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("R² (held out)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small",
               frameon=False)


DRAW: dict[str, tuple[Callable[[Figure, pd.DataFrame, PlotOptions], None], list[str]]] = {
    "9": (draw_figure9, ["panel", "width", "l0", "setting", "pct_recovered"]),
    "10b": (draw_figure10b, ["target", "source", "predictor", "r2"]),
    "15": (draw_figure15, ["act_noise", "rec_noise", "ablate_percent", "fvu_recon",
                           "fvu_recon_linear"]),
}


def plot(figure: str, table_path: str, out: str, opts: PlotOptions) -> Path:
    """Draw ``figure`` from ``table_path`` into the PDF ``out`` (written atomically)."""
    draw, columns = DRAW[figure]
    table = read_table(table_path, columns)
    if table.empty:
        raise h5io.InputFileError(f"{table_path}: no rows")
    return save_pdf(lambda fig: draw(fig, table, opts), table_path, out, opts.width,
                    opts.height, opts.font_size)


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.stage_parser("saeflow.figures.error_effects", __doc__)
    p.add_argument("--figure", required=True, choices=sorted(DRAW))
    p.add_argument("--table", required=True, help="the figure's table (.csv)")
    p.add_argument("--out", required=True, help="the figure (.pdf)")
    p.add_argument("--width", type=float, default=7.0, help="inches")
    p.add_argument("--height", type=float, default=3.0, help="inches")
    p.add_argument("--log-x", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-y", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--font-size", type=float, default=8.0, help="points")
    args = p.parse_args(argv)
    if min(args.width, args.height, args.font_size) <= 0:
        p.error("--width, --height and --font-size must be positive")
    opts = PlotOptions(width=args.width, height=args.height, log_x=args.log_x, log_y=args.log_y,
                       font_size=args.font_size)
    plot(args.figure, args.table, args.out, opts)


if __name__ == "__main__":
    main()
