"""Figure 8: detection by activation decile for SAEs on the linear vs nonlinear error component.

``python -m saeflow.figures.figure8 table --results LIN.jsonl NONLIN.jsonl --labels linear
nonlinear --out tables/figure8.csv``
``python -m saeflow.figures.figure8 plot --table tables/figure8.csv --out plots/figure8.pdf
[--scorer detection] [--width 6] [--height 3.5] [--font-size 8]``

The table pools, per dictionary and scorer, the per-latent counts of the scorer's records
(:mod:`saeflow.autointerp.score`: ``decile_positives`` / ``decile_totals`` [10] and
``nonactivating_positives`` / ``nonactivating_totals``) over all latents, as the original
``compare_dictionaries.py`` pooled examples rather than averaging per-latent rates. Columns:

``dictionary``, ``scorer``, ``x`` ("Not", "Q1" … "Q10"; Q10 = highest-activation decile),
``k`` (correct answers: non-activating examples called inactive for "Not", activating examples
called active for Qi), ``n`` (examples with a parseable answer), ``value`` = k / n (1 − FPR for
"Not", recall for Qi), ``wald_half`` = 1.96·sqrt(p(1 − p)/n) (the original's error bar),
``wilson_lo`` / ``wilson_hi`` (95% Wilson interval), ``latents`` (latents pooled; a latent whose
explanation failed has no examples scored).

The plot draws only the table: value ± wald_half for each dictionary, one scorer (default
detection), and names each dictionary's balanced accuracy (pooled recall over Q1…Q10 and
1 − FPR, averaged: 0.5 is chance, whatever the judge's bias) in the legend. As with the other figures, the PDF has no creation date and its ``Subject`` names
the table's SHA-256.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from saeflow import h5io
from saeflow.autointerp import scoring
from saeflow.figures.pdf import read_table, save_pdf

SCORERS = ("detection", "fuzzing")
X_LABELS = ["Not"] + [f"Q{q}" for q in range(1, 11)]
COLUMNS = ["dictionary", "scorer", "x", "k", "n", "value", "wald_half", "wilson_lo", "wilson_hi",
           "latents"]
COUNT_KEYS = ("decile_positives", "decile_totals", "nonactivating_positives",
              "nonactivating_totals")


def read_records(path: str) -> list[dict]:
    """Per-latent records of one results.jsonl, checked for the count fields of each scorer."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise h5io.InputFileError(f"{path}:{line_no}: not JSON ({err})") from err
            for scorer in SCORERS:
                missing = [k for k in COUNT_KEYS if k not in record.get(scorer, {})]
                if missing:
                    raise h5io.InputFileError(
                        f"{path}:{line_no}: record lacks {scorer}.{missing}")
            records.append(record)
    if not records:
        raise h5io.InputFileError(f"{path}: no records")
    return records


def pooled(records: list[dict], scorer: str) -> scoring.DecileCounts:
    """Counts of one scorer summed over latents."""
    return scoring.pool_counts(
        scoring.DecileCounts(np.asarray(r[scorer]["decile_positives"]),
                             np.asarray(r[scorer]["decile_totals"]),
                             int(r[scorer]["nonactivating_positives"]),
                             int(r[scorer]["nonactivating_totals"]))
        for r in records)


def figure_table(results: dict[str, list[dict]]) -> pd.DataFrame:
    """The table behind the plot: one row per dictionary × scorer × x (see the docstring)."""
    rows = []
    for dictionary, records in results.items():
        latents = sum(r.get("explanation") is not None for r in records)
        for scorer in SCORERS:
            for row in scoring.figure_rows(pooled(records, scorer)):
                rows.append({"dictionary": dictionary, "scorer": scorer, **row,
                             "latents": latents})
    return pd.DataFrame(rows, columns=pd.Index(COLUMNS))


def balanced_accuracy(part: pd.DataFrame) -> float:
    """(pooled recall over Q1..Q10 + (1 - FPR)) / 2 of one dictionary's rows; nan if a side is
    empty. 0.5 is chance whatever the judge's bias: a judge that says yes to everything scores
    recall 1 and 1 - FPR 0."""
    deciles = part[part.x != "Not"]
    not_row = part[part.x == "Not"]
    n_pos, n_neg = float(deciles.n.sum()), float(not_row.n.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return 0.5 * (float(deciles.k.sum()) / n_pos + float(not_row.k.sum()) / n_neg)


@dataclass(frozen=True)
class PlotOptions:
    width: float = 6.0
    """Figure width in inches."""
    height: float = 3.5
    """Figure height in inches."""
    font_size: float = 8.0
    """Base font size in points."""
    scorer: str = "detection"
    """Which scorer's rows to draw (the paper's Figure 8 is detection)."""


def draw(fig: Figure, table: pd.DataFrame, opts: PlotOptions) -> None:
    """value ± wald_half over Not, Q1..Q10, one series per dictionary, slightly offset."""
    ax = fig.add_subplot()
    rows = table[table.scorer == opts.scorer]
    dictionaries = list(dict.fromkeys(rows.dictionary))
    pos = np.arange(len(X_LABELS))
    colors = matplotlib.colormaps["viridis"](np.linspace(0.15, 0.75, max(len(dictionaries), 1)))
    for i, (name, color) in enumerate(zip(dictionaries, colors)):
        part = pd.DataFrame(rows[rows.dictionary == name]).set_index("x").reindex(X_LABELS)
        shift = (i - (len(dictionaries) - 1) / 2) * 0.15
        value = part.value.to_numpy(dtype=float)
        half = part.wald_half.to_numpy(dtype=float)
        latents = int(part.latents.dropna().iloc[0]) if part.latents.notna().any() else 0
        bal = balanced_accuracy(part.reset_index())
        # "Not" is another quantity (1 - FPR) than the deciles' recall: a point, not on the line
        ax.errorbar(pos[:1] + shift, value[:1], yerr=half[:1], fmt="s", color=color, ms=3.5,
                    capsize=2)
        ax.errorbar(pos[1:] + shift, value[1:], yerr=half[1:], fmt="o-", color=color, ms=3.5,
                    lw=1, capsize=2, label=f"{name} error SAE ({latents} latents, balanced accuracy {bal:.2f})")
    ax.set_xticks(pos, X_LABELS)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("Non-activating examples, then activation decile (Q10 highest)")
    ax.set_ylabel("1 − FPR (Not), recall (Qi)")
    ax.set_title(f"{opts.scorer.capitalize()} scoring, pooled over latents (95% intervals)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize="small")


def plot(table_path: str, out: str, opts: PlotOptions) -> Path:
    """Draw ``out`` (PDF, written atomically) from the table alone."""
    table = read_table(table_path, COLUMNS)
    if not (table.scorer == opts.scorer).any():
        raise h5io.InputFileError(f"{table_path}: no rows for scorer {opts.scorer!r}")
    return save_pdf(lambda fig: draw(fig, table, opts), table_path, out, opts.width,
                    opts.height, opts.font_size)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.figures.figure8", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="pool the scorers' counts into tables/figure8.csv")
    table.add_argument("--results", nargs="+", required=True, help="results.jsonl per dictionary")
    table.add_argument("--labels", nargs="+", required=True, help="a name per results file")
    table.add_argument("--out", required=True, help="the table (.csv)")
    draw_p = sub.add_parser("plot", help="draw plots/figure8.pdf from the table")
    draw_p.add_argument("--table", required=True)
    draw_p.add_argument("--out", required=True)
    defaults = PlotOptions()
    draw_p.add_argument("--scorer", choices=SCORERS, default=defaults.scorer)
    for name in ("width", "height", "font_size"):
        draw_p.add_argument(f"--{name.replace('_', '-')}", type=float,
                            default=getattr(defaults, name))
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if args.command == "table":
        if len(args.results) != len(args.labels) or len(set(args.labels)) != len(args.labels):
            p.error("--labels must name each --results file once, with distinct names")
        table = figure_table({label: read_records(path)
                              for label, path in zip(args.labels, args.results)})
        with h5io.atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
    else:
        if min(args.width, args.height, args.font_size) <= 0:
            p.error("--width, --height and --font-size must be positive")
        plot(args.table, args.out, PlotOptions(args.width, args.height, args.font_size,
                                               args.scorer))


if __name__ == "__main__":
    main()
