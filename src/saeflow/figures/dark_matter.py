"""Stage: draw a Dark Matter figure from its table (``tables/figureN.csv`` -> ``plots/figureN.pdf``).

``python -m saeflow.figures.dark_matter --figure N --table tables/figureN.csv
--out plots/figureN.pdf [--width 6] [--height 3.5] [--log-x | --no-log-x] [--log-y | --no-log-y]
[--cmap viridis] [--font-size 8]``

Every number drawn comes from the table (written by :mod:`saeflow.dark_matter.scaling`, which
also documents what each figure shows and which stage writes each table); nothing is fitted or
interpolated here. ``--figure`` is one of 1-7, 10a and 11-14. The PDF's
``Subject`` names the table and its SHA-256, and it carries no creation date, so the same table
and options give the same bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle
from matplotlib.ticker import NullFormatter

from saeflow import cli, h5io
from saeflow.figures.pdf import read_table, save_pdf

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
    magnify_start: int = 85
    """Figure 11: first window offset of the magnified panel."""
    magnify_length: int = 10
    """Figure 11: tokens in the magnified panel."""


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
        rows = table.loc[table.k == k]
        for quantity, marker, name in [("fvu", "o", "FVU"), ("fvu_nonlinear", "s", "nonlinear FVU")]:
            measured = rows.loc[(rows.kind == "measured") & (rows.quantity == quantity)]
            ax.plot(measured.width, measured.value, marker, color=color, ms=4,
                    mfc=color if quantity == "fvu" else "none", label=f"{name}, k = {k}")
        for kind, style in [("fit", "-"), ("mean", "--")]:
            line = rows.loc[rows.kind == kind].sort_values("width")
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


def draw_figure5(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Per k, stacked bars per width: nonlinear, encoder and linear error add up to the FVU."""
    ks = sorted(table.k.unique())
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    parts = [("nonlinear_error", "Nonlinear error"), ("encoder_error", "Encoder error"),
             ("linear_error", "Linear error")]
    for ax, k in zip(axes, ks):
        rows = table.loc[table.k == k].sort_values("width")
        pos = np.arange(len(rows))
        bottom = np.zeros(len(rows))
        for (column, label), color in zip(parts, BAND_COLORS[:3]):
            height = rows[column].to_numpy(dtype=float)
            ax.bar(pos, height, 0.7, bottom=bottom, color=color, alpha=0.7, label=label,
                   edgecolor=["red" if h < 0 else "none" for h in height])
            bottom = bottom + height
        ax.plot(pos, rows.fvu_test, "o", color="k", ms=3.5, label="SAE FVU (held out)")
        ax.set_xticks(pos, [f"{w:g}" for w in rows.width])
        ax.set_xlabel("SAE width")
        ax.set_title(f"k = {k}")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("FVU")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                    frameon=False)
    fig.suptitle("SAE error with pursuit, per SAE (negative parts outlined red)")


def _matrix(fig: Figure, table: pd.DataFrame, column: str, title: str, unit: str,
            opts: PlotOptions) -> None:
    """Width × width matrix of ``column``; below the diagonal masked, as the original."""
    ax = fig.add_subplot()
    grid = table.pivot(index="width_x", columns="width_y", values=column)
    grid = grid.sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float, copy=True)
    values[np.tril_indices(len(values), k=-1)] = np.nan
    image = ax.imshow(values, cmap=opts.cmap)
    fig.colorbar(image, ax=ax, label=unit)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                    color="white" if value < middle else "black")
    ax.set_xticks(range(values.shape[1]), [f"{w:g}" for w in grid.columns], rotation=45)
    ax.set_yticks(range(values.shape[0]), [f"{w:g}" for w in grid.index])
    ax.set_xlabel("SAE width (target ‖err‖)")
    ax.set_ylabel("SAE width (predictor)")
    n_test = int(table.n_test.iloc[0])
    ax.set_title(f"{title}\n(held out, {n_test} tokens)")


def draw_figure6(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """R² of predicting ‖err_y‖ from [‖err_x‖, 1] per token, over pairs of widths."""
    _matrix(fig, table, "r2", "Per-token predictability of the error norm", "R²", opts)


def draw_figure10a(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Share of the unexplained variance that ‖nonlinear_x‖ explains when added (percent)."""
    _matrix(fig, table, "improvement_percent", "Gain from adding ‖nonlinear err‖",
            "% of 1 − R² explained", opts)


def _window_lines(ax: Axes, table: pd.DataFrame, column: str, lw: float = 0.8) -> None:
    widths = sorted(table.width.unique())
    colors = matplotlib.colormaps["inferno"](np.linspace(0.0, 0.8, len(widths)))
    for width, color in zip(widths, colors):
        rows = table.loc[table.width == width].sort_values("offset")
        ax.plot(rows.offset, rows[column], color=color, lw=lw, label=f"{width:g}")


def draw_figure11(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """‖SaeError‖ per token over the window for every width, with a magnified stretch."""
    main, zoom = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for ax in (main, zoom):
        _window_lines(ax, table, "error_norm")
    lo = opts.magnify_start
    hi = min(lo + opts.magnify_length, int(table.offset.max()))
    if not 0 <= lo < hi:
        raise ValueError(f"magnify_start {lo} is outside the window (offsets 0.."
                         f"{int(table.offset.max())})")
    inside = table.loc[(table.offset >= lo) & (table.offset <= hi)]
    pad = 0.05 * float(inside.error_norm.max() - inside.error_norm.min() or 1.0)
    bottom, top = inside.error_norm.min() - pad, inside.error_norm.max() + pad
    zoom.set_xlim(lo, hi)
    zoom.set_ylim(bottom, top)
    labels = inside.drop_duplicates("offset").sort_values("offset")
    if "token_text" in labels and labels.token_text.notna().all():
        text = [repr(t) for t in labels.token_text.astype(str)]
    else:  # no tokenizer was given: token ids
        text = [str(t) for t in labels.token]
    zoom.set_xticks(labels.offset, text, rotation=70, fontsize="small")
    main.add_patch(Rectangle((lo, bottom), hi - lo, top - bottom, fill=False, ec="gray", lw=1))
    for xa, ya, xb, yb in [(lo, bottom, 0, 0), (hi, bottom, 1, 0), (lo, top, 0, 1), (hi, top, 1, 1)]:
        fig.add_artist(ConnectionPatch(xyA=(xa, ya), xyB=(xb, yb), coordsA="data",
                                       coordsB="axes fraction", axesA=main, axesB=zoom,
                                       color="gray", ls="--", alpha=0.5))
    main.set_xlabel(f"Token (offset from row {int(table.row.min())})")
    main.set_ylabel("‖SaeError‖ (L2)")
    main.legend(title="SAE width", fontsize="small", ncol=2, frameon=False)


def draw_figure12(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Norms of the linearly predictable and the nonlinear error per token, per width."""
    left, right = fig.subplots(1, 2, sharey=True)
    _window_lines(left, table, "linear_norm", 0.6)
    _window_lines(right, table, "nonlinear_norm", 0.6)
    left.set_title("Norm of linearly predictable error")
    right.set_title("Norm of nonlinear error")
    left.set_ylabel("L2 norm")
    for ax in (left, right):
        ax.set_xlabel("Token")
        ax.spines[["top", "right"]].set_visible(False)
    right.legend(title="SAE width", fontsize="small", loc="upper left",
                 bbox_to_anchor=(1.01, 1.0), frameon=False)


def draw_figure7(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Violins of held-out R² predicting each part's squared norm from x, over the SAEs."""
    ax = fig.add_subplot()
    targets = list(dict.fromkeys(table.target))  # table order
    labels = dict(zip(table.target, table.label))
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(targets)))
    for pos, (target, color) in enumerate(zip(targets, colors), start=1):
        values = table.loc[table.target == target, "r2"].to_numpy(dtype=float)
        if np.ptp(values) > 0 and len(values) > 1:
            # matplotlib types every value as a Collection; "bodies" is a list of them
            violin = ax.violinplot([values], [pos], showextrema=False)
            body = violin["bodies"][0]  # pyright: ignore[reportIndexIssue]
            body.set_facecolor(color)
            body.set_edgecolor("black")
            body.set_alpha(0.6)
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        ax.plot(pos + np.asarray(jitter), values, "o", color="k", ms=2.5)
        ax.plot([pos - 0.25, pos + 0.25], [values.mean()] * 2, color="k", lw=1)
    ax.set_xticks(range(1, len(targets) + 1), [labels[t] for t in targets], rotation=30,
                  ha="right")
    ax.set_ylabel("Norm prediction test R²")
    ax.set_title(f"Predicting squared norms from x ({table.sae_id.nunique()} SAEs; "
                 "bar = mean)")
    ax.spines[["top", "right"]].set_visible(False)


def draw_figure13(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Held-out R² of predicting ‖SaeError‖² per SAE: from x against baselines."""
    ax = fig.add_subplot()
    saes = table.drop_duplicates("sae_id").sort_values(["layer", "width", "k"], na_position="first")
    names = [f"L{lay} w{w:g}" + (f" k{k:g}" if np.isfinite(k) else "")
             for lay, w, k in zip(saes.layer, saes.width, saes.k.astype(float))]
    pos = {sae: i for i, sae in enumerate(saes.sae_id)}
    for predictor in dict.fromkeys(table.predictor):
        rows = table[table.predictor == predictor]
        x = rows.sae_id.map(pos).to_numpy()
        order = np.argsort(x)
        ax.plot(x[order], rows.r2.to_numpy()[order], "o-", ms=3.5, lw=1,
                label=rows.label.iloc[0])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("Test R² predicting ‖SaeError‖²")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def draw_figure14(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """Each live latent's decoder row · norm probe a*, sorted by mean activation when active."""
    ax = fig.add_subplot()
    rows = table.sort_values("rank")
    ax.plot(rows["rank"], rows.probe_similarity, lw=0.5, alpha=0.5, label="$(a^*)^T d_i$")
    ax.plot(rows["rank"], rows.probe_similarity_smoothed, lw=1.2,
            label="running mean of $(a^*)^T d_i$")
    ax.plot(rows["rank"], rows.mean_act_when_active, lw=1.2, color="k",
            label="mean activation when active")
    # the raw similarities are noisy; scale the axis to the smoothed curve and the activations
    # (as the original's fixed ylim did), so the comparison stays readable
    shown = np.concatenate([rows.probe_similarity_smoothed, rows.mean_act_when_active])
    low, high = float(np.min(shown)), float(np.max(shown))
    pad = 0.5 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    first = rows.iloc[0]
    ax.set_title(f"{first.sae_id}: norm fit R² {first.norm_r2:.3f}, "
                 f"Pearson r {first.pearson:.3f}")
    ax.set_xlabel("SAE latent, sorted by mean activation when active")
    ax.legend(fontsize="small", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


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


DRAW: dict[str, tuple[Callable[[Figure, pd.DataFrame, PlotOptions], None], list[str]]] = {
    "1": (draw_figure1, ["width", "k", "measured", "extrapolated", "total_fvu", "a", "m", "c",
                         *[b for b, _ in BANDS], "fvu", "fvu_nonlinear", "fvu_nonlinear_pursuit"]),
    "2": (draw_figure2, ["kind", "quantity", "k", "width", "value"]),
    "3": (draw_figure3, ["width", "k", "r2_error_vector", "r2_error_norm"]),
    "4": (draw_figure4, ["width", "k", "fvu_nonlinear"]),
    "5": (draw_figure5, ["k", "width", "fvu_test", "linear_error", "encoder_error",
                         "nonlinear_error"]),
    "6": (draw_figure6, ["width_x", "width_y", "r2", "n_test"]),
    "7": (draw_figure7, ["sae_id", "target", "label", "r2"]),
    "10a": (draw_figure10a, ["width_x", "width_y", "improvement_percent", "n_test"]),
    "11": (draw_figure11, ["offset", "row", "token", "width", "error_norm"]),
    "12": (draw_figure12, ["offset", "width", "linear_norm", "nonlinear_norm"]),
    "13": (draw_figure13, ["sae_id", "layer", "width", "k", "predictor", "label", "r2"]),
    "14": (draw_figure14, ["rank", "sae_id", "probe_similarity", "probe_similarity_smoothed",
                           "mean_act_when_active", "norm_r2", "pearson"]),
}


def plot(figure: int | str, table_path: str, out: str, opts: PlotOptions) -> Path:
    """Draw figure ``figure`` from ``table_path`` into the PDF ``out`` (written atomically)."""
    draw, columns = DRAW[str(figure)]
    table = read_table(table_path, columns)
    if table.empty:
        raise h5io.InputFileError(f"{table_path}: no rows")
    return save_pdf(lambda fig: draw(fig, table, opts), table_path, out, opts.width,
                    opts.height, opts.font_size)


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, PlotOptions]:
    p = cli.stage_parser("saeflow.figures.dark_matter", __doc__)
    p.add_argument("--figure", required=True, choices=list(DRAW))
    p.add_argument("--table", required=True, help="the figure's table (.csv)")
    p.add_argument("--out", required=True, help="the figure (.pdf)")
    defaults = PlotOptions()
    p.add_argument("--width", type=float, default=defaults.width, help="inches")
    p.add_argument("--height", type=float, default=defaults.height, help="inches")
    p.add_argument("--log-x", action=argparse.BooleanOptionalAction, default=defaults.log_x)
    p.add_argument("--log-y", action=argparse.BooleanOptionalAction, default=defaults.log_y)
    p.add_argument("--cmap", default=defaults.cmap, help="matplotlib colour map (heat maps)")
    p.add_argument("--font-size", type=float, default=defaults.font_size, help="points")
    p.add_argument("--magnify-start", type=int, default=defaults.magnify_start,
                   help="Figure 11: first offset of the magnified panel")
    p.add_argument("--magnify-length", type=int, default=defaults.magnify_length,
                   help="Figure 11: tokens in the magnified panel")
    args = p.parse_args(argv)
    if args.cmap not in matplotlib.colormaps:
        p.error(f"--cmap {args.cmap!r} is not a matplotlib colour map")
    if min(args.width, args.height, args.font_size) <= 0:
        p.error("--width, --height and --font-size must be positive")
    if args.magnify_start < 0 or args.magnify_length < 1:
        p.error("--magnify-start must be >= 0 and --magnify-length >= 1")
    opts = PlotOptions(args.width, args.height, args.log_x, args.log_y, args.cmap, args.font_size,
                       args.magnify_start, args.magnify_length)
    return args, opts


def main(argv: Sequence[str] | None = None) -> None:
    args, opts = _parse_args(argv)
    plot(args.figure, args.table, args.out, opts)


if __name__ == "__main__":
    main()
