"""Stage: probes in one regime over many datasets, written in the original's CSV schemas.

``python -m saeflow.probing.run baseline --acts D.h5 [...] --site S --layer L --regime R --out O.csv``
``python -m saeflow.probing.run sae --sae-acts Z.h5 [...] --sae-id ID --layer L --regime R --out O.csv``

In the ``ood`` regime every ``--acts`` / ``--sae-acts`` file has its OOD set beside it in the same
order (``--ood-acts``): probes train on the dataset and are scored on its OOD
set (the original's ``get_OOD_traintest``; its ``OOD_setting`` files held the in-distribution test
split instead, reference B9.5).

Baselines: L2 logistic regression on the last-token activations (``method = logreg``) and the
original's PCA, KNN, XGBoost and MLP baselines (:mod:`saeflow.probing.baselines`,
``--methods``). SAE probes: latents ranked on the training rows by |mean(pos) - mean(neg)| after dividing each latent
by its mean non-zero magnitude (the current code's ``get_sorted_indices`` with
``mean_act_normalization``; ``--ranking mean_diff`` is the paper's plain difference), the top k
into an L1 probe; with ``--binarize`` each probe is fitted a second time on binarised latents
(x > threshold; the original research code's 1, the sae-probes wheel's x != 0), after the ranking
on the raw latents as both originals do. Rows of the SAE CSV: ``test_f1, test_acc,
test_auc, val_auc, k, dataset, layer, sae_id, reg_type, binarize`` + the regime's column; of the
baseline CSV: ``dataset, method, test_f1, test_acc, test_auc, val_auc, layer`` + the column
(+ ``C`` and ``params``, the chosen hyper-parameters as JSON).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from saeflow.h5io import atomic_path
from saeflow.probing import baselines, probe, regimes
from saeflow.probing.acts import read
from saeflow.probing.sae_acts import read_sparse

# The regime's column in the original CSVs (reference B5).
VALUE_COLUMN = {"normal": None, "scarcity": "num_train", "imbalance": "frac",
                "label_noise": "corrupt_frac", "ood": None}


def rank_latents(z: np.ndarray, y: np.ndarray, ranking: str = "normalized_mean_diff") -> np.ndarray:
    """Latent indices by decreasing |mean(z | y=1) - mean(z | y=0)| (``z`` [n, d_sae] dense)."""
    if ranking == "normalized_mean_diff":
        # sae_probes.run_sae_evals.mean_act_normalization: abs, so negative latents rank too
        col_mean = np.abs(z).sum(0) / ((z != 0).sum(0) + 1e-6)
        z = z / (col_mean + 1e-6)
    elif ranking != "mean_diff":
        raise ValueError(f"ranking '{ranking}': expected normalized_mean_diff or mean_diff")
    diff = z[y == 1].mean(0) - z[y == 0].mean(0)
    return np.argsort(-np.abs(diff), kind="stable")


def _value_row(regime: str, value: float, n_train: int) -> dict:
    col = VALUE_COLUMN[regime]
    return {} if col is None else {col: value, **({"num_train": n_train} if col != "num_train" else {})}


def binarize_latents(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """float32 1 where a latent's activation exceeds ``threshold`` (strictly), else 0."""
    return (np.asarray(x) > threshold).astype(np.float32)


def eval_sets(x, y: np.ndarray, regime: str, values: tuple[float, ...], seed: int,
              ood: tuple | None = None) -> list[tuple[regimes.Split, Any, np.ndarray]]:
    """(split, test features, test labels) per split of ``regime``; the ood regime trains on
    ``x`` and tests on ``ood`` = (features, labels) of the OOD set. ``x`` dense or CSR."""
    if regime == "ood":
        if ood is None:
            raise ValueError("regime 'ood' needs the OOD set's activations (--ood-acts)")
        return [(regimes.ood_split(y, len(ood[1]), seed), ood[0], ood[1])]
    if ood is not None:
        raise ValueError(f"an OOD set was given to regime '{regime}'; only 'ood' uses one")
    return [(sp, x[sp.test], y[sp.test]) for sp in regimes.splits(y, regime, values, seed)]


def baseline_rows(name: str, x: np.ndarray, y: np.ndarray, layer: int, regime: str,
                  values: tuple[float, ...], backend: probe.Backend, seed: int,
                  methods: Sequence[str] = ("logreg",), ood: tuple | None = None) -> list[dict]:
    """One row per (split, method); logreg on the chosen backend, the others by sklearn/XGBoost."""
    rows = []
    for sp, x_te, y_te in eval_sets(x, y, regime, values, seed, ood):
        for method in methods:
            if method == "logreg":
                (m,) = probe.select_logreg(x[sp.train], sp.y_train, x_te, y_te, "l2",
                                           seed=seed, backend=backend)
                scores = {**asdict(m), "params": json.dumps({"C": m.C})}
            else:
                scores = asdict(baselines.select(method, x[sp.train], sp.y_train, x_te, y_te,
                                                 seed))
            rows.append({"dataset": name, "method": method, **scores, "layer": layer,
                         **_value_row(regime, sp.value, len(sp.train))})
    return rows


def sae_rows(name: str, z_all, y: np.ndarray, sae_id: str, layer: int, regime: str,
             values: tuple[float, ...], ks: list[int], ranking: str, binarize: bool,
             backend: probe.Backend, seed: int, ood: tuple | None = None,
             threshold: float = 1.0) -> list[dict]:
    """One row per (split, k) on the raw latents, and with ``binarize`` one more per (split, k)
    on the binarised latents (``binarize`` column True). ``z_all`` CSR [n, d_sae]."""
    rows = []
    for sp, z_te, y_te in eval_sets(z_all, y, regime, values, seed, ood):
        z_tr = np.asarray(z_all[sp.train].toarray())
        order = rank_latents(z_tr, sp.y_train, ranking)[: max(ks)]
        x_tr, x_te = z_tr[:, order], np.asarray(z_te[:, order].toarray())
        ks_ok = [k for k in ks if k <= z_tr.shape[1]]
        variants = [(False, x_tr, x_te)]
        if binarize:
            variants.append((True, binarize_latents(x_tr, threshold),
                             binarize_latents(x_te, threshold)))
        for binarized, f_tr, f_te in variants:
            for k, m in zip(ks_ok, probe.select_logreg(f_tr, sp.y_train, f_te, y_te, "l1",
                                                       ks=ks_ok, seed=seed, backend=backend)):
                rows.append({**asdict(m), "k": k, "dataset": name, "layer": layer,
                             "sae_id": sae_id, "reg_type": "l1", "binarize": binarized,
                             **_value_row(regime, sp.value, len(sp.train))})
    return rows


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saeflow.probing.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["baseline", "sae"])
    p.add_argument("--acts", action="append", default=[], help="probing acts file (baseline)")
    p.add_argument("--sae-acts", action="append", default=[], help="SAE acts file (sae)")
    p.add_argument("--ood-acts", action="append", default=[],
                   help="ood regime: the OOD set of each --acts / --sae-acts file, in order")
    p.add_argument("--site", default="", help="site of the activations (baseline)")
    p.add_argument("--sae-id", default="")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--regime", choices=regimes.REGIMES, required=True)
    p.add_argument("--values", type=float, nargs="*", default=[], help="the regime's grid")
    p.add_argument("--methods", nargs="+", default=["logreg"],
                   choices=["logreg", *baselines.METHODS], help="baseline methods")
    p.add_argument("--ks", type=int, nargs="*", default=[16, 128])
    p.add_argument("--ranking", default="normalized_mean_diff")
    p.add_argument("--binarize", action="store_true", help="also probe binarised latents")
    p.add_argument("--binarize-threshold", type=float, default=1.0,
                   help="a latent counts as on above this (original 1; sae-probes wheel 0)")
    p.add_argument("--backend", choices=["torch", "sklearn", "sklearn-converged"], default="torch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    values = tuple(int(v) if args.regime == "scarcity" else v for v in args.values)
    rows: list[dict] = []
    files = args.acts if args.kind == "baseline" else args.sae_acts
    if args.regime == "ood" and len(args.ood_acts) != len(files):
        raise SystemExit(f"regime ood: got {len(files)} activation files but "
                         f"{len(args.ood_acts)} --ood-acts; expected one OOD set per file")
    if args.regime != "ood" and args.ood_acts:
        raise SystemExit(f"--ood-acts given to regime '{args.regime}'; only 'ood' reads them")
    oods: list[str | None] = list(args.ood_acts) if args.regime == "ood" else [None] * len(files)
    load = (lambda p: read(p, args.site)) if args.kind == "baseline" else read_sparse
    for path, ood_path in tqdm(list(zip(files, oods)), desc=f"{args.kind} {args.regime}",
                               unit="ds"):
        name = Path(path).stem
        x, y = load(path)
        ood = load(ood_path) if ood_path else None
        if args.kind == "baseline":
            rows += baseline_rows(name, np.asarray(x), y, args.layer, args.regime, values,
                                  args.backend, args.seed, args.methods, ood)
        else:
            rows += sae_rows(name, x, y, args.sae_id, args.layer, args.regime, values, args.ks,
                             args.ranking, args.binarize, args.backend, args.seed, ood,
                             args.binarize_threshold)
    with atomic_path(args.out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


if __name__ == "__main__":
    main()
