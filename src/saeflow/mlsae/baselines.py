"""Stage: the paper's comparison of MLSAEs with single-layer SAEs, as one table.

``python -m saeflow.mlsae.baselines --mlsae-layers A/layers.csv ... --baseline-layers
B/layers.csv ... --pair sae-x1-k8-layer2=mlsae-x1-k8 ... --out tables/mlsae_vs_single_layer.csv``

A baseline ``sae-x{R}-k{k}-layer{l}`` is the MLSAE trainer run on layer ``l`` alone, at the
width and k of the MLSAE it is paired with, on the same cached tokens in the same order (same
seed) and with the same knobs: the original's single-layer SAEs were its ``MLSAE`` with one layer
(``tim-lawson/sae-pythia-70m-deduped-x64-k32-tfm-layers-4``). Both are evaluated by
:mod:`saeflow.mlsae.evaluate` on the same evaluation tokens. One row per baseline, keyed by its
``sae_id``: the MLSAE's metrics at that layer (``*_mlsae``), the baseline's (``*_single``), and
``fvu_ratio`` = FVU_mlsae / FVU_single.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from saeflow import h5io

METRICS: tuple[str, ...] = ("fvu", "mse", "mean_l0", "l1", "dead_fraction", "delta_ce", "kl",
                            "ce_clean")
"""Columns of the evaluation's layers.csv compared (those present)."""


class CompareError(ValueError):
    """A pair names an id or layer that the evaluation tables do not hold."""


def compare(mlsae_layers: pd.DataFrame, baseline_layers: pd.DataFrame,
            pairs: dict[str, str]) -> pd.DataFrame:
    """One row per baseline (``pairs``: baseline id -> MLSAE id) from both layers tables."""
    metrics = [m for m in METRICS if m in mlsae_layers and m in baseline_layers]
    rows = []
    for sae_id, mlsae_id in sorted(pairs.items()):
        single = baseline_layers.loc[baseline_layers["sae_id"] == sae_id]
        if len(single) != 1:
            raise CompareError(f"baseline '{sae_id}': {len(single)} rows in its layers table, "
                               "expected 1")
        layer = int(single["layer"].iloc[0])
        multi = mlsae_layers.loc[(mlsae_layers["sae_id"] == mlsae_id)
                                 & (mlsae_layers["layer"] == layer)]
        if len(multi) != 1:
            raise CompareError(f"MLSAE '{mlsae_id}' has {len(multi)} rows at layer {layer} "
                               f"(for baseline '{sae_id}'), expected 1")
        row: dict[str, object] = {"sae_id": sae_id, "mlsae_id": mlsae_id, "layer": layer}
        for m in metrics:
            row[f"{m}_mlsae"] = float(multi[m].iloc[0])
            row[f"{m}_single"] = float(single[m].iloc[0])
        row["fvu_ratio"] = row["fvu_mlsae"] / row["fvu_single"]  # type: ignore[operator]
        rows.append(row)
    return pd.DataFrame(rows)


def _pair(text: str) -> tuple[str, str]:
    baseline, sep, mlsae = text.partition("=")
    if not sep or not baseline or not mlsae:
        raise argparse.ArgumentTypeError(f"--pair '{text}': expected BASELINE_ID=MLSAE_ID")
    return baseline, mlsae


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.mlsae.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlsae-layers", nargs="+", required=True, help="MLSAE layers.csv files")
    p.add_argument("--baseline-layers", nargs="+", required=True,
                   help="baseline layers.csv files")
    p.add_argument("--pair", type=_pair, action="append", required=True,
                   help="BASELINE_ID=MLSAE_ID (repeat)")
    p.add_argument("--out", required=True, help="tables/mlsae_vs_single_layer.csv")
    args = p.parse_args(argv)
    table = compare(pd.concat([pd.read_csv(f) for f in args.mlsae_layers]),
                    pd.concat([pd.read_csv(f) for f in args.baseline_layers]), dict(args.pair))
    with h5io.atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
