"""Stage: combined probing CSVs per regime and the comparison figure drawn from its own CSV.

``python -m saeflow.probing.figures --regime R --baseline B.csv ... --sae S.csv ... \\
    --out-baselines T.csv --out-sae all_metrics.csv --table plots/probing/R.csv --pdf plots/probing/R.pdf``

The figure's CSV holds, per regime value, the mean test AUC over datasets of the L2 baseline,
of the best SAE probe (k chosen per dataset by validation AUC) and of the "quiver of arrows"
choice with and without SAE probes (per dataset the method of highest validation AUC among the
baseline methods, or among them and the SAE probes; ties go to the SAE, as the original's
notebooks). The ood regime's CSV is the original's per-dataset schema instead
(``dataset, test_auc_baseline, test_auc_sae``, + the chosen ``sae_id``, ``k`` and ``binarize``):
the L2 baseline and the SAE probe of highest in-distribution validation AUC, both scored on the
dataset's OOD set, drawn as paired bars per dataset (the original's ``ood_task_comp``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

from saeflow.figures.pdf import read_table, save_pdf
from saeflow.h5io import atomic_path
from saeflow.probing.run import VALUE_COLUMN

COLUMNS = ["value", "baseline_test_auc", "sae_test_auc", "quiver_test_auc",
           "quiver_nosae_test_auc", "n_datasets"]
OOD_COLUMNS = ["dataset", "test_auc_baseline", "test_auc_sae", "sae_id", "k", "binarize"]


def _best(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, value) the row of highest val_auc (first on ties)."""
    return frame.sort_values("val_auc", ascending=False, kind="stable").groupby(
        ["dataset", "value"], as_index=False).first()


def summary(base: pd.DataFrame, sae: pd.DataFrame, regime: str) -> pd.DataFrame:
    """One row per regime value: mean test AUC of the L2 baseline, the best SAE probe and the
    quiver (per dataset the highest validation AUC among every baseline method and SAE probe)."""
    col = VALUE_COLUMN[regime] or "value"
    base = base.assign(value=base.get(col, 0))
    if "method" not in base:
        base = base.assign(method="logreg")
    logreg = pd.DataFrame(base.loc[base["method"] == "logreg", ["dataset", "value", "test_auc"]])
    arrows = pd.DataFrame(_best(base)[["dataset", "value", "test_auc", "val_auc"]])
    joined = logreg.rename(columns={"test_auc": "logreg_auc"}).merge(
        arrows, on=["dataset", "value"]).merge(
        _best(sae.assign(value=sae.get(col, 0))), on=["dataset", "value"], suffixes=("_b", "_s"))
    # ties go to the SAE probe, as the original's notebooks
    joined["quiver"] = joined["test_auc_s"].where(joined["val_auc_s"] >= joined["val_auc_b"],
                                                  joined["test_auc_b"])
    table = joined.groupby("value").agg(
        baseline_test_auc=("logreg_auc", "mean"), sae_test_auc=("test_auc_s", "mean"),
        quiver_test_auc=("quiver", "mean"), quiver_nosae_test_auc=("test_auc_b", "mean"),
        n_datasets=("dataset", "size")).reset_index()
    return pd.DataFrame({c: table[c] for c in COLUMNS})


def ood_summary(base: pd.DataFrame, sae: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: OOD test AUC of the L2 baseline (the site of highest validation AUC if there
    are several) and of the SAE probe (SAE, k, binarisation) of highest validation AUC."""
    base = base.assign(value=0)
    if "method" in base:
        base = pd.DataFrame(base.loc[base["method"] == "logreg"])
    b = pd.DataFrame(_best(base)[["dataset", "test_auc"]]).rename(
        columns={"test_auc": "test_auc_baseline"})
    sae = sae.assign(value=0)
    for col, fill in (("sae_id", ""), ("k", 0), ("binarize", False)):
        if col not in sae:
            sae = sae.assign(**{col: fill})
    s = pd.DataFrame(_best(sae)[["dataset", "test_auc", "sae_id", "k", "binarize"]]).rename(
        columns={"test_auc": "test_auc_sae"})
    return pd.DataFrame(b.merge(s, on="dataset", how="left")[OOD_COLUMNS])


def draw_ood(table: pd.DataFrame):
    def paint(fig: Figure) -> None:
        ax = fig.subplots()
        pos = range(len(table))
        ax.bar([p - 0.2 for p in pos], table["test_auc_baseline"], 0.4, label="L2 baseline")
        ax.bar([p + 0.2 for p in pos], table["test_auc_sae"], 0.4, label="best SAE probe")
        ax.set_xticks(list(pos), list(table["dataset"]), rotation=30, ha="right")
        ax.set_ylabel("OOD test AUC")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.legend()
    return paint


def draw(table: pd.DataFrame, regime: str):
    def paint(fig: Figure) -> None:
        ax = fig.subplots()
        for column, label in [("baseline_test_auc", "L2 baseline"),
                              ("sae_test_auc", "best SAE probe"),
                              ("quiver_nosae_test_auc", "quiver (baselines only)"),
                              ("quiver_test_auc", "quiver (baselines + SAE)")]:
            ax.plot(table["value"], table[column], marker="o", label=label)
        ax.set_xlabel(VALUE_COLUMN[regime] or "normal regime")
        ax.set_ylabel("mean test AUC")
        if regime == "scarcity":
            ax.set_xscale("log")
        ax.legend()
    return paint


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.probing.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", required=True, choices=list(VALUE_COLUMN))
    p.add_argument("--baseline", action="append", required=True)
    p.add_argument("--sae", action="append", default=[])
    for name in ("--out-baselines", "--out-sae", "--table", "--pdf"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    base = pd.concat([read_table(b, ["dataset", "test_auc", "val_auc"]) for b in args.baseline])
    sae = pd.concat([read_table(s, ["dataset", "test_auc", "val_auc", "sae_id", "k"])
                     for s in args.sae]) if args.sae else pd.DataFrame(columns=base.columns)
    for frame, out in ((base, args.out_baselines), (sae, args.out_sae)):
        with atomic_path(out) as tmp:
            frame.to_csv(tmp, index=False)
    ood = args.regime == "ood"
    table = ood_summary(base, sae) if ood else summary(base, sae, args.regime)
    with atomic_path(args.table) as tmp:
        table.to_csv(tmp, index=False)
    if ood:
        save_pdf(draw_ood(read_table(args.table, OOD_COLUMNS)), args.table, args.pdf, 5.0, 3.2, 9)
    else:
        save_pdf(draw(read_table(args.table, COLUMNS), args.regime), args.table, args.pdf,
                 5.0, 3.2, 9)


if __name__ == "__main__":
    main()
