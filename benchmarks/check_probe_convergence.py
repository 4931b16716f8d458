"""Where the batched probe engine and sklearn differ, and why (not a timed test).

L2, on a probing activation file of the pipeline::

    python benchmarks/check_probe_convergence.py results/probing/acts/smollm2/87_glue_cola.h5

fits one L2 logistic probe per C on the first 600 of a seeded shuffle of the file (standardised on
those rows) and prints the test AUC on the rest: the engine at its default tolerance (1e-8) and at
sklearn's (1e-4), sklearn's lbfgs as the original runs it (max_iter 1000) and converged (max_iter
1e5, tol 1e-8), and sklearn's newton-cholesky at tol 1e-10.

L1, on the SAE latents of ``benchmarks/bench_probing.py``'s cache::

    python benchmarks/check_probe_convergence.py --l1 5_hist_fig_ismale --k 512

takes the normal regime's training split and top-k latents (as the SAE probes), fits one L1
probe per C on the first validation fold's training rows and prints the objective
``C * sum(loss) + ||w||_1`` and the test AUC of the engine, of the original's saga (max_iter
1000) and of liblinear (tol 1e-8; its intercept carries a |b|/100 penalty, which can only raise
its objective under this one).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from saeflow.probing import engine
from saeflow.probing.run import eval_sets, rank_latents
from saeflow.probing.sae_acts import encode_sparse
from saeflow.saes import load_sae

SKLEARN_L2 = {
    "lbfgs_1000": {"solver": "lbfgs", "max_iter": 1000},
    "lbfgs_converged": {"solver": "lbfgs", "max_iter": 100000, "tol": 1e-8},
    "newton_cholesky": {"solver": "newton-cholesky", "max_iter": 1000, "tol": 1e-10},
}
SKLEARN_L1 = {
    "saga_1000": {"solver": "saga", "max_iter": 1000},
    "liblinear": {"solver": "liblinear", "tol": 1e-8, "max_iter": 1000, "intercept_scaling": 100},
}


def check_l2(args: argparse.Namespace) -> None:
    with h5py.File(args.acts) as f:
        acts, labels = f[f"acts/{args.site}"], f["y"]
        assert isinstance(acts, h5py.Dataset) and isinstance(labels, h5py.Dataset), args.acts
        x = np.asarray(acts[:], dtype=np.float64)
        y = np.asarray(labels[:], dtype=np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    tr, te = order[: args.n_train], order[args.n_train :]
    scaler = StandardScaler().fit(x[tr])
    xtr, xte = scaler.transform(x[tr]), scaler.transform(x[te])
    for c in args.cs or [1.0, 100.0, 1e5]:
        row: dict[str, float] = {}
        for name, gtol in (("engine", 1e-8), ("engine_tol_1e-4", 1e-4)):
            fit = engine.fit_l2(torch.tensor(xtr), torch.tensor(y[tr]), torch.ones(1, len(tr)),
                                torch.tensor([c]), gtol=gtol)  # fmt: skip
            scores = xte @ fit.coef[0].numpy() + fit.intercept[0].item()
            row[name] = float(roc_auc_score(y[te], scores))
        for name, kw in SKLEARN_L2.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs_1000 does not converge at large C
                model = LogisticRegression(C=c, **kw).fit(xtr, y[tr])
            row[name] = float(roc_auc_score(y[te], model.decision_function(xte)))
        print(f"C {c:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)


def check_l1(args: argparse.Namespace) -> None:
    work = Path(args.work)
    saved = np.load(work / f"acts_{args.l1}_1124_256.npz")
    z = encode_sparse(load_sae(str(work / "sae_w9216_k32_131072")), saved["x"])
    split, z_te, y_te = next(iter(eval_sets(z, saved["y"], "normal", (), 42, None)))
    z_tr = np.asarray(z[split.train].toarray())
    top = rank_latents(z_tr, split.y_train, "normalized_mean_diff")[: args.k]
    x_all, x_te = z_tr[:, top].astype(np.float64), np.asarray(z_te[:, top].toarray())
    rows = engine.cv_splits(split.y_train, 42)[0][0]
    x, y = x_all[rows], split.y_train[rows]

    def objective(w: np.ndarray, b: float, c: float) -> float:
        margins = x @ w + b
        return float(c * np.sum(np.logaddexp(0, margins) - y * margins) + np.abs(w).sum())

    for c in args.cs or list(engine.C_GRID[:5]):
        out = []
        start = time.perf_counter()
        fit = engine.fit_l1(torch.tensor(x), torch.tensor(y, dtype=torch.float64),
                            torch.ones(1, len(y)), torch.tensor([c]))
        w, b = fit.coef[0].double().numpy(), fit.intercept[0].item()
        out.append(("engine", objective(w, b, c), roc_auc_score(y_te, x_te @ w),
                    time.perf_counter() - start))
        for name, kw in SKLEARN_L1.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # saga stops at max_iter
                model = LogisticRegression(C=c, penalty="l1", random_state=42, **kw).fit(x, y)
            out.append((name, objective(model.coef_[0], model.intercept_[0], c),
                        roc_auc_score(y_te, x_te @ model.coef_[0]), time.perf_counter() - start))
        print(f"C {c:g}: " + " | ".join(f"{n} objective {o:.5g}, test AUC {a:.4f}, {t:.1f} s"
                                        for n, o, a, t in out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description="Engine vs sklearn probes: objectives and AUCs")
    p.add_argument("acts", nargs="?", help="L2: probing activation file (probing/acts/{model}/{dataset}.h5)")
    p.add_argument("--site", default="blocks.6.hook_resid_post")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--cs", type=float, nargs="+", default=None)
    p.add_argument("--l1", metavar="DATASET", help="L1 on this dataset's SAE latents instead")
    p.add_argument("--k", type=int, default=512, help="--l1: top-k latents")
    p.add_argument("--work", default="/tmp/bench-probing", help="--l1: bench_probing's cache")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.l1:
        check_l1(args)
    elif args.acts:
        check_l2(args)
    else:
        p.error("give a probing activation file (L2) or --l1 DATASET")


if __name__ == "__main__":
    main()
