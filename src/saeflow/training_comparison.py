"""Stage module: compare SAE training techniques on the same activations.

    python -m saeflow.training_comparison table --sae saes/{id} ... --family F ...
        --metrics sae_eval/{id}/{corpus}.metrics.json ... --log-dir logs/train_sae
        --bench-dir benchmarks/train_sae --out tables/training_comparison.csv
    python -m saeflow.training_comparison plot --table tables/training_comparison.csv
        --out plots/training_comparison.pdf [--width W --height H]

The table is long-form, one row per (SAE, point): ``source = train_log`` rows follow training
(the trainer's CSV log: FVU, L0, dead fraction against training tokens), and one
``source = eval`` row per SAE holds the held-out evaluation (FVU, CE-loss score, L0, dead
fraction) at the SAE's final token count. The three trainers log different columns; they are
mapped onto one schema by :func:`normalise_log`: saeflow's TopK and saex trainers log ``fvu``
and ``dead_fraction``; SAELens's trainer logs ``explained_variance`` (FVU = 1 - it) and
``dead_features`` (a count, divided by d_sae).

Wall time: where the log has ``tokens_per_s`` (saeflow's TopK trainer) it is the cumulative
training time; otherwise the rule's wall time (its Snakemake benchmark) apportioned linearly in
tokens (``wall_from`` says which). The eval row's wall time is the whole training rule's.
The plot writes the CSV behind it next to the PDF.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from saeflow.h5io import InputFileError, atomic_path

COLUMNS = (
    "family", "sae_id", "architecture", "d_sae", "source", "tokens", "wall_s", "wall_from",
    "fvu", "ce_loss_score", "l0", "dead_fraction",
)  # fmt: skip


def normalise_log(log: pd.DataFrame, d_sae: int, bench_s: float | None) -> pd.DataFrame:
    """A trainer's CSV log as columns tokens, wall_s, wall_from, fvu, l0, dead_fraction."""
    for need in ("tokens", "l0"):
        if need not in log:
            raise InputFileError(f"training log has no column {need!r} (columns: {list(log)})")
    out = pd.DataFrame({"tokens": log["tokens"].astype(int), "l0": log["l0"].astype(float)})
    if "fvu" in log:
        out["fvu"] = log["fvu"].astype(float)
    elif "explained_variance" in log:
        out["fvu"] = 1.0 - log["explained_variance"].astype(float)
    else:
        raise InputFileError(
            f"training log has neither 'fvu' nor 'explained_variance': {list(log)}"
        )
    if "dead_fraction" in log:
        out["dead_fraction"] = log["dead_fraction"].astype(float)
    elif "dead_features" in log:
        out["dead_fraction"] = log["dead_features"].astype(float) / d_sae
    else:
        out["dead_fraction"] = math.nan
    if "tokens_per_s" in log:
        steps = out["tokens"].diff().fillna(out["tokens"])
        out["wall_s"] = (steps / log["tokens_per_s"].astype(float)).cumsum()
        out["wall_from"] = "log"
    else:
        final = max(int(out["tokens"].to_numpy().max()), 1) if len(out) else 1
        out["wall_s"] = out["tokens"] / final * bench_s if bench_s is not None else math.nan
        out["wall_from"] = "benchmark_share"
    return out


def read_bench_seconds(path: Path) -> float | None:
    """Wall seconds of a Snakemake benchmark file (its first row), None if absent."""
    if not path.is_file():
        return None
    table = pd.read_csv(path, sep="\t")
    return float(table["s"].iloc[0]) if len(table) else None


def comparison_table(
    sae_dirs: Sequence[str],
    families: Sequence[str],
    metrics: Sequence[str],
    log_dir: str,
    bench_dir: str,
) -> pd.DataFrame:
    """The long-form table (see the module docstring) of the SAEs, in the given order."""
    if not len(sae_dirs) == len(families) == len(metrics):
        raise ValueError(
            f"--sae ({len(sae_dirs)}), --family ({len(families)}) and --metrics "
            f"({len(metrics)}) must name the same number of SAEs"
        )
    parts = []
    for sae_dir, family, metrics_path in zip(sae_dirs, families, metrics):
        sae_id = Path(sae_dir).name
        cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
        meta = cfg.get("metadata", {})
        arch = meta.get("training_architecture") or cfg.get("architecture")
        d_sae = int(cfg["d_sae"])
        bench_s = read_bench_seconds(Path(bench_dir) / f"{sae_id}.tsv")
        log_path = Path(log_dir) / f"{sae_id}.train_log.csv"
        if not log_path.is_file():
            raise InputFileError(f"{log_path}: training log of {sae_id} not found")
        log = normalise_log(pd.read_csv(log_path), d_sae, bench_s)
        log["source"] = "train_log"
        log["ce_loss_score"] = math.nan
        m = json.loads(Path(metrics_path).read_text())
        final = (
            int(log["tokens"].to_numpy().max())
            if len(log)
            else int(meta.get("saeflow_train_stats", {}).get("tokens", 0))
        )
        total_wall = (
            bench_s if bench_s is not None else (log["wall_s"].max() if len(log) else math.nan)
        )
        ev = pd.DataFrame([{
            "source": "eval", "tokens": final, "wall_s": total_wall,
            "wall_from": "benchmark" if bench_s is not None else "log", "fvu": m.get("fvu"),
            "ce_loss_score": m.get("ce_loss_score"), "l0": m.get("mean_l0"),
            "dead_fraction": m.get("dead_fraction"),
        }])  # fmt: skip
        part = pd.concat([log, ev], ignore_index=True)
        part["family"], part["sae_id"], part["architecture"], part["d_sae"] = (
            family, sae_id, arch, d_sae,
        )  # fmt: skip
        parts.append(part[list(COLUMNS)])
    if not parts:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(parts, ignore_index=True)


def write_csv(table: pd.DataFrame, out: str | Path) -> Path:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return Path(out)


PANELS = (  # (column, x axis, title)
    ("fvu", "tokens", "FVU (training batches)"),
    ("l0", "tokens", "L0"),
    ("dead_fraction", "tokens", "dead fraction"),
    ("fvu", "wall_s", "FVU (training batches)"),
    ("ce_loss_score", "wall_s", "CE-loss score (held out)"),
    ("fvu_eval", "wall_s", "FVU (held out)"),
)


def plot(table_path: str, out: str, width: float, height: float) -> Path:
    """Six panels: training FVU, L0, dead fraction against tokens; training FVU, held-out
    CE-loss score and held-out FVU against wall time. One colour per family, one line per SAE.
    Writes the plotted rows as ``<out>.csv`` beside the PDF."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    table = pd.read_csv(table_path)
    families = list(dict.fromkeys(table["family"]))
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(2, 3, figsize=(width, height), constrained_layout=True)
    logs = pd.DataFrame(table[table["source"] == "train_log"])
    evals = pd.DataFrame(table[table["source"] == "eval"])
    for ax, (col, x, title) in zip(axes.flat, PANELS):
        for family in families:
            if col in ("ce_loss_score", "fvu_eval"):
                rows = evals[evals["family"] == family]
                y = rows["ce_loss_score" if col == "ce_loss_score" else "fvu"]
                ax.scatter(rows[x], y, color=colours[family], s=12, label=family)
                continue
            mine = pd.DataFrame(logs[logs["family"] == family])
            for _, rows in mine.groupby("sae_id", sort=False):
                ax.plot(rows[x], rows[col], color=colours[family], lw=0.8, alpha=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("training tokens" if x == "tokens" else "wall time (s)", fontsize=7)
        ax.tick_params(labelsize=6)
        if x == "tokens":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if col == "l0":
            ax.set_yscale("log")
    handles = [Line2D([], [], color=colours[f], label=f) for f in families]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(families), 4), fontsize=7)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)
    write_csv(table, Path(out).with_suffix(".csv"))
    return Path(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.training_comparison")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="build tables/training_comparison.csv")
    t.add_argument("--sae", nargs="+", required=True, help="SAE folders saes/{sae_id}")
    t.add_argument("--family", nargs="+", required=True, help="each SAE's family, same order")
    t.add_argument("--metrics", nargs="+", required=True, help="each SAE's evaluation JSON")
    t.add_argument("--log-dir", required=True, help="folder of {sae_id}.train_log.csv")
    t.add_argument("--bench-dir", required=True, help="folder of the training rule's {sae_id}.tsv")
    t.add_argument("--out", required=True)
    f = sub.add_parser("plot", help="draw plots/training_comparison.pdf (+ its CSV)")
    f.add_argument("--table", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--width", type=float, default=9.0)
    f.add_argument("--height", type=float, default=5.0)
    return p


def main(argv: Sequence[str] | None = None) -> Any:
    args = _parser().parse_args(argv)
    if args.command == "table":
        table = comparison_table(args.sae, args.family, args.metrics, args.log_dir, args.bench_dir)
        return write_csv(table, args.out)
    return plot(args.table, args.out, args.width, args.height)


if __name__ == "__main__":
    main()
