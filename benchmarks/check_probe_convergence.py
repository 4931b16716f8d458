"""Where the batched L2 engine and sklearn differ, and why (not a timed test).

    python benchmarks/check_probe_convergence.py results/probing/acts/smollm2/87_glue_cola.h5

Fits one L2 logistic probe per C on the first 600 of a seeded shuffle of a probing activation
file (standardised on those rows) and prints the test AUC on the rest: the engine at sklearn's
default tolerance and at 1e-10, sklearn's lbfgs as the original runs it (max_iter 1000) and
converged (max_iter 1e5, tol 1e-8), and sklearn's newton-cholesky at tol 1e-10.
"""

from __future__ import annotations

import argparse
import warnings

import h5py
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from saeflow.probing.engine import fit_l2

SKLEARN = {
    "lbfgs_1000": {"solver": "lbfgs", "max_iter": 1000},
    "lbfgs_converged": {"solver": "lbfgs", "max_iter": 100000, "tol": 1e-8},
    "newton_cholesky": {"solver": "newton-cholesky", "max_iter": 1000, "tol": 1e-10},
}


def main() -> None:
    p = argparse.ArgumentParser(description="Engine vs sklearn L2 probes, at two tolerances")
    p.add_argument("acts", help="probing activation file (probing/acts/{model}/{dataset}.h5)")
    p.add_argument("--site", default="blocks.6.hook_resid_post")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--cs", type=float, nargs="+", default=[1.0, 100.0, 1e5])
    args = p.parse_args()
    torch.set_num_threads(1)
    with h5py.File(args.acts) as f:
        acts, labels = f[f"acts/{args.site}"], f["y"]
        assert isinstance(acts, h5py.Dataset) and isinstance(labels, h5py.Dataset), args.acts
        x = np.asarray(acts[:], dtype=np.float64)
        y = np.asarray(labels[:], dtype=np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    tr, te = order[: args.n_train], order[args.n_train :]
    scaler = StandardScaler().fit(x[tr])
    xtr, xte = scaler.transform(x[tr]), scaler.transform(x[te])
    for c in args.cs:
        row: dict[str, float] = {}
        for name, gtol, max_iter in (("engine", 1e-4, 100), ("engine_tight", 1e-10, 1000)):
            fit = fit_l2(torch.tensor(xtr), torch.tensor(y[tr]), torch.ones(1, len(tr)),
                         torch.tensor([c]), max_iter=max_iter, gtol=gtol)  # fmt: skip
            scores = xte @ fit.coef[0].numpy() + fit.intercept[0].item()
            row[name] = float(roc_auc_score(y[te], scores))
        for name, kw in SKLEARN.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs_1000 does not converge at large C
                model = LogisticRegression(C=c, **kw).fit(xtr, y[tr])
            row[name] = float(roc_auc_score(y[te], model.decision_function(xte)))
        print(f"C {c:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
