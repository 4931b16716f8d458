"""MLSAE figures, each drawn only from the CSV written beside it (``plots/mlsae/``).

``python -m saeflow.figures.mlsae dists --dists D.safetensors --sae-id ID --csv OUT.csv --pdf OUT.pdf``
    the original's ``dists_heatmap``: each latent's share of its activation at each layer,
    latents sorted by their mean layer (``figures/dists_heatmaps.py``, colour map ``magma_r``).
    The CSV has one row per (latent, layer) with ``latent``, ``rank`` (its position after
    sorting), ``layer``, ``prob``, plus ``layer_mean`` and ``layer_std`` of the latent.
``python -m saeflow.figures.mlsae fvu --layers tables/mlsae_layers.csv --csv OUT.csv --pdf OUT.pdf``
    FVU and ΔCE against layer, one line per MLSAE.
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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.figures.mlsae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["dists", "fvu"])
    p.add_argument("--dists", help="dists.safetensors (dists)")
    p.add_argument("--sae-id", default="", help="MLSAE id (dists)")
    p.add_argument("--layers", help="tables/mlsae_layers.csv (fvu)")
    p.add_argument("--csv", required=True, help="the table the plot is drawn from")
    p.add_argument("--pdf", required=True, help="the plot")
    p.add_argument("--width", type=float, default=5.5)
    p.add_argument("--height", type=float, default=2.5)
    args = p.parse_args(argv)
    if args.kind == "dists":
        table = dists_table(args.dists, args.sae_id)
        columns, draw = ["rank", "layer", "prob"], draw_dists
    else:
        table = read_table(args.layers, ["sae_id", "layer", "fvu"])
        columns, draw = ["sae_id", "layer", "fvu"], draw_fvu
    with h5io.atomic_path(args.csv) as tmp:
        table.to_csv(tmp, index=False)
    table = read_table(args.csv, columns)
    save_pdf(draw(table), args.csv, args.pdf, args.width, args.height, 8.0)


if __name__ == "__main__":
    main()
