"""MLSAE figures, each drawn only from the CSV written beside it (``plots/mlsae/``).

``python -m saeflow.figures.mlsae dists --dists D.safetensors --sae-id ID --csv OUT.csv --pdf OUT.pdf``
    the original's ``dists_heatmap``: each latent's share of its activation at each layer,
    latents sorted by their mean layer (``figures/dists_heatmaps.py``, colour map ``magma_r``).
    The CSV has one row per (latent, layer) with ``latent``, ``rank`` (its position after
    sorting), ``layer``, ``prob``, plus ``layer_mean`` and ``layer_std`` of the latent.
    With ``--hist-csv/--hist-pdf``: the density of the latents' mean layer, 16 bins per layer
    (``figures/dists_histograms.py``); with ``--sae DIR --cos-csv/--cos-pdf``: the 2-D histogram
    over latent pairs of |Δ mean layer| and decoder cosine similarity
    (``figures/dists_cos_sim_heatmaps.py``; :func:`saeflow.mlsae.math.pair_histogram`).
``python -m saeflow.figures.mlsae fvu --layers tables/mlsae_layers.csv --csv OUT.csv --pdf OUT.pdf``
    FVU and ΔCE against layer, one line per MLSAE.
``python -m saeflow.figures.mlsae summary --mmcs T --resid T --embed-latents T --layer-std T
--sweep T --out-dir plots/mlsae``
    ``mmcs`` (heatmap of MMCS per ordered pair), ``resid_cos_sim`` (adjacent-layer cosine
    similarity against layer), ``embed_cos_sim`` (histograms of each latent's largest cosine
    similarity to the embeddings and unembeddings), ``layer_std`` (mean per-latent layer std
    per MLSAE), ``sweep`` (mean FVU and ΔCE over expansion factor x k); each PDF beside its CSV.
``python -m saeflow.figures.mlsae prompt --saes ID=DIR ... --model M --prompt TEXT
--out-dir plots/mlsae``
    ``prompt_heatmap_{id}``: the activation at each layer of every (token, latent) pair active on
    the paper's prompt, pairs sorted by mean layer (:mod:`saeflow.mlsae.prompt`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from safetensors.torch import load_file

from saeflow import h5io
from saeflow.figures.pdf import read_table, save_pdf
from saeflow.mlsae.math import summarise_dists
from saeflow.mlsae.similarity import pair_histogram

HIST_BINS_PER_LAYER = 16
"""The original's ``16 * n_layers`` bins of the mean-layer histogram."""
PAIR_BINS = (64, 512)
PAIR_RANGES = ((0.0, 5.0), (-0.25, 0.25))
"""The original's dists cos-sim heatmap: bins and ranges of (|Δ mean layer|, cosine)."""


def dists_table(dists_path: str, sae_id: str) -> pd.DataFrame:
    """Long table of the layer distributions of the latents that fired."""
    totals = load_file(dists_path)["totals"].double()
    alive = totals.sum(0) > 0
    d = summarise_dists(totals[:, alive])
    latents = alive.nonzero().squeeze(1).numpy()
    order = np.argsort(d.layer_mean.numpy(), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    n_layers = totals.shape[0]
    return pd.DataFrame({
        "sae_id": sae_id, "latent": np.repeat(latents, n_layers),
        "rank": np.repeat(rank, n_layers), "layer": np.tile(np.arange(n_layers), len(latents)),
        "prob": d.probs.T.reshape(-1).numpy(),
        "layer_mean": np.repeat(d.layer_mean.numpy(), n_layers),
        "layer_std": np.repeat(d.layer_std.numpy(), n_layers)})


def draw_dists(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        grid = table.pivot(index="layer", columns="rank", values="prob").to_numpy()
        ax = fig.add_subplot()
        image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest",
                          origin="lower")
        ax.set_xlabel("latent (sorted by mean layer)")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="share of activation")
    return draw


def draw_fvu(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 2)
        for sae_id, rows in table.groupby("sae_id"):
            axes[0].plot(rows["layer"], rows["fvu"], marker=".", label=str(sae_id))
            if "delta_ce" in rows:
                axes[1].plot(rows["layer"], rows["delta_ce"], marker=".", label=str(sae_id))
        axes[0].set(xlabel="layer", ylabel="FVU")
        axes[1].set(xlabel="layer", ylabel="ΔCE (nats)")
        axes[0].legend(fontsize="small")
    return draw


def histogram_table(dists_path: str, sae_id: str) -> pd.DataFrame:
    """Density of the fired latents' mean layer over [0, n_layers - 1], 16 bins per layer."""
    totals = load_file(dists_path)["totals"].double()
    n_layers = totals.shape[0]
    mean = summarise_dists(totals[:, totals.sum(0) > 0]).layer_mean.numpy()
    density, edges = np.histogram(mean, bins=HIST_BINS_PER_LAYER * n_layers,
                                  range=(0, n_layers - 1), density=True)
    return pd.DataFrame({"sae_id": sae_id, "layer_lo": edges[:-1], "layer_hi": edges[1:],
                         "density": density})


def cos_sim_table(dists_path: str, sae_dir: str, sae_id: str) -> pd.DataFrame:
    """Nonzero bins of the pair histogram of the fired latents (long table)."""
    from saeflow.mlsae.trainer import load_mlsae

    totals = load_file(dists_path)["totals"].double()
    alive = totals.sum(0) > 0
    mean = summarise_dists(totals[:, alive]).layer_mean
    counts = pair_histogram(load_mlsae(sae_dir).params.W_dec[alive], mean, PAIR_BINS,
                            *PAIR_RANGES)
    ix, iy = counts.nonzero(as_tuple=True)
    (x0, x1), (y0, y1) = PAIR_RANGES
    return pd.DataFrame({
        "sae_id": sae_id, "dmean_lo": x0 + ix.numpy() * (x1 - x0) / PAIR_BINS[0],
        "cos_lo": y0 + iy.numpy() * (y1 - y0) / PAIR_BINS[1],
        "count": counts[ix, iy].numpy().astype(np.int64)})


def draw_histogram(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.stairs(table["density"], np.append(table["layer_lo"], table["layer_hi"].iloc[-1]),
                  fill=True)
        ax.set(xlabel="mean layer of the latent", ylabel="density")
    return draw


def draw_cos_sim(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        (x0, x1), (y0, y1) = PAIR_RANGES
        grid = np.zeros(PAIR_BINS)
        ix = np.round((table["dmean_lo"] - x0) / (x1 - x0) * PAIR_BINS[0]).astype(int)
        iy = np.round((table["cos_lo"] - y0) / (y1 - y0) * PAIR_BINS[1]).astype(int)
        grid[ix, iy] = table["count"]
        ax = fig.add_subplot()
        image = ax.imshow(grid.T, aspect="auto", origin="lower", cmap="magma_r",
                          extent=(x0, x1, y0, y1), interpolation="nearest")
        ax.set(xlabel="|Δ mean layer|", ylabel="decoder cosine similarity")
        fig.colorbar(image, ax=ax, label="latent pairs")
    return draw


def draw_mmcs(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        grid = table.pivot(index="sae_a", columns="sae_b", values="mean")
        ax = fig.add_subplot()
        image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(grid.columns)), list(grid.columns), rotation=90,
                      fontsize="small")
        ax.set_yticks(range(len(grid.index)), list(grid.index), fontsize="small")
        ax.set(xlabel="to (b)", ylabel="latents of (a)")
        fig.colorbar(image, ax=ax, label="MMCS")
    return draw


def draw_resid(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        rows = table[table["next_layer"] >= 0]
        ax = fig.add_subplot()
        for col, label in (("cos_sim", "centred"), ("cos_sim_raw", "raw")):
            ax.errorbar(rows["layer"], rows[f"{col}_mean"], yerr=rows[f"{col}_std"],
                        marker=".", capsize=2, label=label)
        ax.set(xlabel="layer l", ylabel="cos(resid_l, resid_l+1)")
        ax.legend(fontsize="small")
    return draw


def draw_embed(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 2, sharey=True)
        for ax, side in zip(axes, ("in", "out")):
            for sae_id, rows in table.groupby("sae_id"):
                ax.hist(rows[f"{side}_cos_sim"], bins=50, range=(0, 1), histtype="step",
                        density=True, label=str(sae_id))
            ax.set(xlabel=f"max cos to {'embeddings' if side == 'in' else 'unembeddings'}")
        axes[0].set_ylabel("density")
        axes[0].legend(fontsize="x-small")
    return draw


def draw_layer_std(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.bar(range(len(table)), table["mean"], yerr=table["std"], capsize=2)
        ax.set_xticks(range(len(table)), list(table["sae_id"]), rotation=90, fontsize="small")
        ax.set_ylabel("per-latent layer std")
    return draw


def draw_sweep(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        cols = [c for c in ("mean_fvu", "mean_delta_ce") if c in table]
        axes = fig.subplots(1, len(cols), squeeze=False)[0]
        for ax, col in zip(axes, cols):
            grid = table.pivot_table(index="expansion_factor", columns="k", values=col)
            image = ax.imshow(grid.to_numpy(), cmap="magma_r", origin="lower", aspect="auto")
            ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
            ax.set_yticks(range(len(grid.index)), [f"{r:g}" for r in grid.index])
            ax.set(xlabel="k", ylabel="expansion factor", title=col)
            for (i, j), value in np.ndenumerate(grid.to_numpy()):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="small")
            fig.colorbar(image, ax=ax)
    return draw


SUMMARY = {
    "mmcs": (draw_mmcs, ["sae_a", "sae_b", "mean"]),
    "resid_cos_sim": (draw_resid, ["layer", "next_layer", "cos_sim_mean", "cos_sim_std",
                                   "cos_sim_raw_mean", "cos_sim_raw_std"]),
    "embed_cos_sim": (draw_embed, ["sae_id", "in_cos_sim", "out_cos_sim"]),
    "layer_std": (draw_layer_std, ["sae_id", "mean", "std"]),
    "sweep": (draw_sweep, ["expansion_factor", "k", "mean_fvu"]),
}
"""Summary figure name -> (drawer, columns its CSV must hold)."""


def draw_prompt(table: pd.DataFrame):
    def draw(fig: Figure) -> None:
        grid = table.pivot(index="layer", columns="rank", values="act").to_numpy()
        ax = fig.add_subplot()
        image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest",
                          origin="lower")
        ax.set_xlabel("(token, latent) pair, sorted by mean layer")
        ax.set_ylabel("layer index")
        fig.colorbar(image, ax=ax, label="activation")
    return draw


def _prompt(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from saeflow.mlsae.prompt import layer_residuals, prompt_latents, prompt_table
    from saeflow.mlsae.trainer import load_mlsae
    from saeflow.models import load_model

    if not args.saes or not args.model or not args.out_dir:
        raise SystemExit("prompt needs --saes, --model and --out-dir")
    model, tokenizer = load_model(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    tokens = [str(tokenizer.decode([t])) for t in ids[0].tolist()]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple[int, ...], torch.Tensor] = {}
    for item in args.saes:
        sae_id, _, path = item.partition("=")
        sae = load_mlsae(path)
        key = tuple(sae.layers)
        if key not in cache:
            cache[key] = layer_residuals(model, ids, sae.layers)
        table = prompt_table(prompt_latents(sae, cache[key]), tokens, sae.layers, sae_id)
        _plot(table, str(out / f"prompt_heatmap_{sae_id}.csv"),
              str(out / f"prompt_heatmap_{sae_id}.pdf"), draw_prompt,
              ["rank", "layer", "act"], args.width, args.height)


def _plot(table: pd.DataFrame, csv: str, pdf: str, draw, columns: list[str], width: float,
          height: float) -> None:
    """Write ``table`` to ``csv``, then draw ``pdf`` from the CSV as read back."""
    with h5io.atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    save_pdf(draw(read_table(csv, columns)), csv, pdf, width, height, 8.0)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.figures.mlsae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["dists", "fvu", "summary", "prompt"])
    p.add_argument("--dists", help="dists.safetensors (dists)")
    p.add_argument("--sae-id", default="", help="MLSAE id (dists)")
    p.add_argument("--layers", help="tables/mlsae_layers.csv (fvu)")
    p.add_argument("--csv", help="the table the plot is drawn from (dists, fvu)")
    p.add_argument("--pdf", help="the plot (dists, fvu)")
    for name in ("hist-csv", "hist-pdf", "cos-csv", "cos-pdf"):
        p.add_argument(f"--{name}", help=f"dists: optional {name}")
    p.add_argument("--sae", help="dists: the MLSAE folder (for --cos-*)")
    for name in ("mmcs", "resid", "embed-latents", "layer-std", "sweep"):
        p.add_argument(f"--{name}", help=f"summary: the {name} table")
    p.add_argument("--out-dir", help="summary, prompt: folder of the PDFs and their CSVs")
    p.add_argument("--saes", nargs="+", help="prompt: ID=DIR per MLSAE")
    p.add_argument("--model", help="prompt: model folder or id")
    p.add_argument("--prompt", default=None, help="prompt: the text (default: the paper's)")
    p.add_argument("--width", type=float, default=5.5)
    p.add_argument("--height", type=float, default=2.5)
    args = p.parse_args(argv)
    if args.kind == "summary":
        _summary(args)
        return
    if args.kind == "prompt":
        from saeflow.mlsae.prompt import PAPER_PROMPT

        args.prompt = args.prompt or PAPER_PROMPT
        _prompt(args)
        return
    if args.csv is None or args.pdf is None:
        p.error(f"{args.kind} needs --csv and --pdf")
    if args.kind == "dists":
        if args.hist_csv and args.hist_pdf:
            _plot(histogram_table(args.dists, args.sae_id), args.hist_csv, args.hist_pdf,
                  draw_histogram, ["layer_lo", "layer_hi", "density"], args.width, args.height)
        if args.cos_csv and args.cos_pdf:
            if not args.sae:
                p.error("--cos-csv/--cos-pdf need --sae")
            _plot(cos_sim_table(args.dists, args.sae, args.sae_id), args.cos_csv, args.cos_pdf,
                  draw_cos_sim, ["dmean_lo", "cos_lo", "count"], args.width, args.height)
        table = dists_table(args.dists, args.sae_id)
        columns, draw = ["rank", "layer", "prob"], draw_dists
    else:
        table = read_table(args.layers, ["sae_id", "layer", "fvu"])
        columns, draw = ["sae_id", "layer", "fvu"], draw_fvu
    with h5io.atomic_path(args.csv) as tmp:
        table.to_csv(tmp, index=False)
    table = read_table(args.csv, columns)
    save_pdf(draw(table), args.csv, args.pdf, args.width, args.height, 8.0)


def _summary(args: argparse.Namespace) -> None:
    from pathlib import Path

    sources = {"mmcs": args.mmcs, "resid_cos_sim": args.resid,
               "embed_cos_sim": args.embed_latents, "layer_std": args.layer_std,
               "sweep": args.sweep}
    missing = [name for name, path in sources.items() if not path]
    if missing or not args.out_dir:
        raise SystemExit(f"summary needs every table and --out-dir; missing {missing}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, path in sources.items():
        draw, columns = SUMMARY[name]
        _plot(pd.read_csv(path), str(out / f"{name}.csv"), str(out / f"{name}.pdf"), draw,
              columns, args.width, args.height)


if __name__ == "__main__":
    main()
