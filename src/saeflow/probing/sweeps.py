"""Stage: the normal regime's sweeps, k against AUC and methods by layer, each beside its CSV.

``python -m saeflow.probing.sweeps --baselines baseline_results.csv --sae all_metrics.csv \\
    --k-table plots/probing/k_vs_auc.csv --k-pdf plots/probing/k_vs_auc.pdf \\
    --layer-table plots/probing/by_layer.csv --layer-pdf plots/probing/by_layer.pdf``

- ``k_vs_auc``: per (SAE, binarised or not, k) the mean test AUC over datasets of the L1 SAE
  probe on the top-k latents, with the L2 baseline's mean at the same layer as the reference
  line (the paper's "how many latents does a probe need").
- ``by_layer``: per (layer, method) the mean test AUC over datasets and the share of datasets on
  which the method has the highest validation AUC of all methods at that layer (the paper's
  "baselines by layer" and "best method by layer"). The SAE probe counts as one method
  (``sae``), with k, SAE and binarisation chosen per dataset by validation AUC.

Both read the combined CSVs that ``probing_figure`` writes for the normal regime; SAE rows keep
their ``sae_id``, the key of ``tables/sae_metrics.csv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from saeflow.figures.pdf import read_table, save_pdf
from saeflow.h5io import atomic_path

K_COLUMNS = ["sae_id", "binarize", "k", "test_auc", "baseline_test_auc", "n_datasets"]
LAYER_COLUMNS = ["layer", "method", "test_auc", "best_share", "n_datasets"]


def k_curve(base: pd.DataFrame, sae: pd.DataFrame) -> pd.DataFrame:
    """Mean test AUC over datasets per (sae_id, binarize, k), beside the L2 baseline's mean
    over the same datasets at the SAE's layer."""
    sae = sae.assign(binarize=sae.get("binarize", False))
    table = sae.groupby(["sae_id", "binarize", "k", "layer"], as_index=False).agg(
        test_auc=("test_auc", "mean"), n_datasets=("dataset", "nunique"))
    logreg = pd.DataFrame(base.loc[base["method"] == "logreg"])
    reference = []
    for sae_id, layer in zip(table["sae_id"], table["layer"]):
        probed = sae.loc[(sae["sae_id"] == sae_id) & (sae["layer"] == layer), "dataset"]
        rows = logreg.loc[(logreg["layer"] == layer) & logreg["dataset"].isin(probed)]
        reference.append(float(rows["test_auc"].mean()))
    table["baseline_test_auc"] = reference
    table["binarize"] = table["binarize"].astype(bool)
    return pd.DataFrame(table[K_COLUMNS])


def by_layer(base: pd.DataFrame, sae: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, method): mean test AUC over datasets, and the share of datasets whose
    highest validation AUC at that layer is the method's (ties shared equally)."""
    best_sae = (sae.sort_values("val_auc", ascending=False, kind="stable")
                .groupby(["dataset", "layer"], as_index=False).first().assign(method="sae"))
    cols = ["dataset", "layer", "method", "test_auc", "val_auc"]
    frame = pd.concat([base[cols], best_sae[cols]], ignore_index=True)
    top = frame.groupby(["dataset", "layer"])["val_auc"].transform("max")
    winners = pd.DataFrame(frame.loc[frame["val_auc"] == top])
    ties = pd.Series(winners.groupby(["dataset", "layer"])["method"].transform("size"))
    winners["share"] = 1.0 / ties.to_numpy(dtype=float)
    wins = pd.Series(winners.groupby(["layer", "method"])["share"].sum()).to_dict()
    n = pd.Series(frame.groupby("layer")["dataset"].nunique()).to_dict()
    table = frame.groupby(["layer", "method"], as_index=False).agg(
        test_auc=("test_auc", "mean"), n_datasets=("dataset", "nunique"))
    table["best_share"] = [float(wins.get((layer, method), 0.0)) / n[layer]
                           for layer, method in zip(table["layer"], table["method"])]
    return pd.DataFrame(table[LAYER_COLUMNS])


def draw_k(table: pd.DataFrame):
    def paint(fig: Figure) -> None:
        ax = fig.subplots()
        for key, group in table.groupby(["sae_id", "binarize"], sort=True):
            sae_id, binarize = tuple(key)  # type: ignore[arg-type]  # pandas types keys as Hashable
            label = f"{sae_id}{' (binarised)' if binarize else ''}"
            line = ax.plot(group["k"], group["test_auc"], marker="o", label=label)[0]
            ax.axhline(group["baseline_test_auc"].iloc[0], color=line.get_color(), lw=0.8,
                       ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (top latents by mean difference)")
        ax.set_ylabel("mean test AUC (dashed: L2 baseline)")
        ax.legend(fontsize="small")
    return paint


def draw_layers(table: pd.DataFrame):
    def paint(fig: Figure) -> None:
        auc, share = fig.subplots(1, 2)
        for method, group in table.groupby("method", sort=True):
            auc.plot(group["layer"], group["test_auc"], marker="o", label=method)
            share.plot(group["layer"], group["best_share"], marker="o", label=method)
        auc.set_ylabel("mean test AUC")
        share.set_ylabel("share of datasets best by val. AUC")
        for ax in (auc, share):
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        auc.legend(fontsize="small")
    return paint


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.probing.sweeps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--baselines", "--sae", "--k-table", "--k-pdf", "--layer-table", "--layer-pdf"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    base = read_table(args.baselines, ["dataset", "method", "layer", "test_auc", "val_auc"])
    sae = read_table(args.sae, ["dataset", "sae_id", "k", "layer", "test_auc", "val_auc"])
    for table, out in ((k_curve(base, sae), args.k_table), (by_layer(base, sae), args.layer_table)):
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
    save_pdf(draw_k(read_table(args.k_table, K_COLUMNS)), args.k_table, args.k_pdf, 5.0, 3.2, 9)
    save_pdf(draw_layers(read_table(args.layer_table, LAYER_COLUMNS)), args.layer_table,
             args.layer_pdf, 7.0, 3.0, 9)


if __name__ == "__main__":
    main()
