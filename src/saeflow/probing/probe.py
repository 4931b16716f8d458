"""Logistic probes with the original's model selection, on the batched engine or on sklearn.

:func:`select_logreg` is ``find_best_reg`` of the original (reference B3) for one or many feature
sets at once: the C grid, the validation folds of :func:`engine.cv_splits`, a 0.5 score for a
training fold with one class, the first C of highest mean validation AUC, a refit on all training
rows, then test F1 (weighted), accuracy and AUC. ``backend="sklearn"`` runs the same selection one
sklearn model at a time with the original's solvers (lbfgs for L2, saga for L1, max_iter 1000: the
reference path), ``backend="torch"`` in one batched solve, ``backend="sklearn-converged"`` one
sklearn model at a time with solvers that reach the optimum (newton-cholesky for L2; liblinear for
L1, whose intercept carries a 1/100 L1 penalty: ``intercept_scaling`` 100).

The original's saga on raw SAE latents stops far from the L1 optimum at large C (its objective
33-31,000x the optimum at C >= 46 after 1,000 epochs, ``benchmarks/check_probe_convergence.py
--l1``), so ``sklearn`` and ``torch`` differ there by where saga stops; ``sklearn-converged`` is
the reference the engine's solutions are checked against.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from saeflow.probing import engine

Backend = Literal["torch", "sklearn", "sklearn-converged"]


@dataclass(frozen=True)
class Metrics:
    """One selected probe's scores (the original's ``Metrics``) and the C it chose."""

    test_f1: float
    test_acc: float
    test_auc: float
    val_auc: float
    C: float


def _scores(y_test: np.ndarray, proba: np.ndarray, val_auc: float, c: float) -> Metrics:
    pred = (proba > 0.5).astype(np.int64)
    return Metrics(float(f1_score(y_test, pred, average="weighted")),
                   float(accuracy_score(y_test, pred)), float(roc_auc_score(y_test, proba)),
                   float(val_auc), float(c))


def select_logreg(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, penalty: str = "l2", ks: list[int] | None = None,
                  cs: tuple[float, ...] = engine.C_GRID, seed: int = 42,
                  backend: Backend = "torch") -> list[Metrics]:
    """One :class:`Metrics` per k (the first k columns of x, in order) or one for all columns."""
    ks = ks or [x_train.shape[1]]
    if backend != "torch":
        return [_sklearn_select(x_train[:, :k], y_train, x_test[:, :k], y_test, penalty, cs, seed,
                                backend == "sklearn-converged")
                for k in ks]
    return _torch_select(x_train, y_train, x_test, y_test, penalty, ks, cs, seed)


def _torch_select(x_train, y_train, x_test, y_test, penalty, ks, cs, seed) -> list[Metrics]:
    """Two batched solves: every (k, C, fold), then per k one refit on all training rows at the
    selected C (as the sklearn path refits), warm-started from that C's fit on the first fold."""
    n = len(y_train)
    folds = engine.cv_splits(y_train, seed) if n > 3 else []
    grid = list(cs) if folds else [1.0]
    kmax = max(ks)
    x = torch.from_numpy(np.ascontiguousarray(x_train[:, :kmax], dtype=np.float32))
    y_t = torch.from_numpy(y_train.astype(np.float64))
    best = [0] * len(ks)
    val = np.zeros((len(ks), len(grid)))
    init: engine.Fit | None = None
    if folds:
        masks = np.zeros((len(folds), n))
        for f, (tr, _) in enumerate(folds):
            masks[f, tr] = 1
        # problems: (k, C, fold) in that order
        j, c, m = np.meshgrid(np.arange(len(ks)), np.arange(len(grid)), np.arange(len(folds)),
                              indexing="ij")
        j, c, m = j.ravel(), c.ravel(), m.ravel()
        cs_t = torch.tensor([grid[i] for i in c], dtype=torch.float64)
        fit = _per_k(x, y_t, torch.from_numpy(masks[m]), cs_t, ks, j, penalty)
        # Validation AUCs of float64 probabilities, as sklearn's predict_proba: at large C they
        # saturate to 1.0 (margins above ~37), and the ties this makes are part of the selection.
        scores = _proba(x, fit.coef, fit.intercept)  # [p, n]
        val = _mean_val_auc(scores, y_train, folds, len(ks), len(grid))  # [k, C]
        best = [int(np.argmax(row)) for row in val]
        first = [int(np.flatnonzero((j == jj) & (c == best[jj]) & (m == 0))[0])
                 for jj in range(len(ks))]
        init = engine.Fit(fit.coef[first], fit.intercept[first])
    cs_best = torch.tensor([grid[b] for b in best], dtype=torch.float64)
    refit = _per_k(x, y_t, torch.ones(len(ks), n, dtype=torch.float64), cs_best, ks,
                   np.arange(len(ks)), penalty, init)
    x_te = torch.from_numpy(np.ascontiguousarray(x_test[:, :kmax], dtype=np.float32))
    out = []
    for jj in range(len(ks)):
        proba = _proba(x_te, refit.coef[jj : jj + 1], refit.intercept[jj : jj + 1])[0].numpy()
        if folds:
            v = float(val[jj, best[jj]])
        else:  # original: no cross-validation for n <= 3; the training AUC stands in
            train = (x @ refit.coef[jj] + refit.intercept[jj]).double()
            v = float(engine.auc(train[None], y_t)[0])
        out.append(_scores(y_test, proba, v, grid[best[jj]]))
    return out


def _proba(x: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """[p, n] float64 probabilities of rows ``x`` [n, d] under ``coef`` [p, d], ``intercept`` [p]."""
    return torch.sigmoid((x.double() @ coef.double().T).T + intercept.double()[:, None])


def _per_k(x, y_t, mask_t, cs_t, ks, j, penalty, init: engine.Fit | None = None) -> engine.Fit:
    """Fits of problems ``j`` (index into ``ks``: each problem uses the first k columns);
    ``init`` (rows as the problems) warm-starts them.

    L1: one batch, the columns as feature masks (each mask gets its own Lipschitz step, and
    FISTA's many cheap iterations are shared by all k). L2: one solve per k (the row-space
    rotation depends on the columns).
    """
    if penalty == "l1":
        widths = torch.tensor(ks)[torch.from_numpy(np.asarray(j))]
        features = torch.arange(x.shape[1])[None, :] < widths[:, None]
        return engine.fit_l1(x, y_t, mask_t, cs_t, features=features, init=init)
    coef = torch.zeros(len(cs_t), x.shape[1])
    intercept = torch.zeros(len(cs_t))
    for jj, k in enumerate(ks):
        rows = torch.from_numpy(np.flatnonzero(j == jj))
        start = None if init is None else engine.Fit(init.coef[rows, :k], init.intercept[rows])
        fit = engine.fit_l2(x[:, :k], y_t, mask_t[rows], cs_t[rows], init=start)
        coef[rows, :k] = fit.coef
        intercept[rows] = fit.intercept
    return engine.Fit(coef, intercept)


def _mean_val_auc(scores, y, folds, n_k, n_c) -> np.ndarray:
    """[k, C] mean validation AUC over folds (0.5 for a fold whose training part has one class)."""
    per = scores.reshape(n_k, n_c, len(folds), -1)
    total = np.zeros((n_k, n_c))
    for f, (tr, va) in enumerate(folds):
        if len(np.unique(y[tr])) < 2:
            total += 0.5
            continue
        s = per[:, :, f, :][:, :, torch.from_numpy(va)].reshape(n_k * n_c, -1)
        total += engine.auc(s.double(), torch.from_numpy(y[va])).reshape(n_k, n_c).numpy()
    return total / len(folds)


def _sklearn_model(penalty: str, c: float, seed: int, converged: bool = False
                   ) -> LogisticRegression:
    if converged and penalty == "l1":
        return LogisticRegression(C=c, penalty="l1", solver="liblinear", tol=1e-8,
                                  intercept_scaling=100, max_iter=1000, random_state=seed)
    if converged:
        return LogisticRegression(C=c, solver="newton-cholesky", tol=1e-8, max_iter=1000)
    if penalty == "l1":
        return LogisticRegression(C=c, penalty="l1", solver="saga", random_state=seed, max_iter=1000)
    return LogisticRegression(C=c, random_state=seed, max_iter=1000)


def _sklearn_select(x_train, y_train, x_test, y_test, penalty, cs, seed,
                    converged: bool = False) -> Metrics:
    """The original's ``find_best_reg``, one sklearn fit per (C, fold) (the reference path).

    ``converged`` fits in float64: sklearn keeps float32 inputs in float32, and at C = 1e5 on raw
    activations the Hessian's rcond is ~1e-10, below float32's resolution."""
    if converged:
        x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if len(y_train) <= 3:
            model = _sklearn_model(penalty, 1.0, seed, converged).fit(x_train, y_train)
            v = roc_auc_score(y_train, model.predict_proba(x_train)[:, 1])
            return _scores(y_test, model.predict_proba(x_test)[:, 1], v, 1.0)
        folds = engine.cv_splits(y_train, seed)
        means = []
        for c in cs:
            fold_scores = []
            for tr, va in folds:
                if len(np.unique(y_train[tr])) < 2:
                    fold_scores.append(0.5)
                    continue
                model = _sklearn_model(penalty, c, seed, converged).fit(x_train[tr], y_train[tr])
                fold_scores.append(roc_auc_score(y_train[va], model.predict_proba(x_train[va])[:, 1]))
            means.append(np.mean(fold_scores))
        best = int(np.argmax(means))
        model = _sklearn_model(penalty, cs[best], seed, converged).fit(x_train, y_train)
        return _scores(y_test, model.predict_proba(x_test)[:, 1], means[best], cs[best])
