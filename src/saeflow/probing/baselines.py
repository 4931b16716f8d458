"""The original's non-logistic baselines (reference B3, ``sae_probes.utils_training``), seeded.

Each method standardises the features on the training rows (``StandardScaler``, applied to the
test rows too: the original's XGBoost n <= 3 branch scored an unscaled test set, B9.7), chooses
its hyper-parameters by mean validation AUC over the folds of :func:`engine.cv_splits` (first
maximum; 0.5 for a fold whose training part has one class), refits on all training rows and
reports test F1 (weighted), accuracy and AUC, as ``find_best_reg`` does for logistic regression.
n <= 3: the first candidate, and the training AUC stands in for the validation AUC.

- **pca**: n_components in unique(int(2 ** linspace(0, log2 m, 10))), m = min(n, d, 100); then
  ``LogisticRegression(C=1)``.
- **knn**: n_neighbors on the same log grid up to min(n - 1, 100, smallest training fold).
- **xgboost**: ``n_iter`` (10) random configurations: n_estimators 50-250, max_depth 2-5,
  learning_rate logspace(-3, -1), subsample and colsample_bytree 0.7-1, reg_alpha and reg_lambda
  logspace(-3, 1), min_child_weight 1-9. The original drew them from the unseeded ``random``
  module (B9.7); here ``numpy.random.RandomState(seed)``, and XGBoost gets ``random_state=seed``.
- **mlp**: ``n_iter`` (1, as the original) random configurations of ``MLPClassifier``: hidden
  layers from (16), (32), (64), (16, 16), (32, 32), (64, 64), (16, 16, 16), (32, 32, 32),
  (64, 64, 64), learning_rate_init logspace(-4, -2, 5), alpha logspace(-5, -2, 5), relu, adam,
  ``random_state=seed``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from saeflow.probing import engine
from saeflow.probing.probe import _scores

METHODS = ("pca", "knn", "xgboost", "mlp")
MLP_HIDDEN = ((16,), (32,), (64,), (16, 16), (32, 32), (64, 64), (16, 16, 16), (32, 32, 32),
              (64, 64, 64))


@dataclass(frozen=True)
class Result:
    """One selected baseline's scores and the hyper-parameters it chose (JSON)."""

    test_f1: float
    test_acc: float
    test_auc: float
    val_auc: float
    params: str


def log_grid(upper: int) -> list[int]:
    """unique(int(2 ** linspace(0, log2 upper, 10))): the original's PCA / KNN grid."""
    return sorted({int(v) for v in np.logspace(0, np.log2(max(upper, 1)), 10, base=2)})


def candidates(method: str, n: int, d: int, folds: list, seed: int,
               n_iter: int | None = None) -> list[dict[str, Any]]:
    """The method's hyper-parameter candidates for n training rows of d features."""
    if method == "pca":
        return [{"n_components": c} for c in log_grid(min(n, d, 100))]
    if method == "knn":
        smallest = min((len(tr) for tr, _ in folds), default=n)
        return [{"n_neighbors": k} for k in log_grid(max(1, min(n - 1, 100, smallest)))]
    rng = np.random.RandomState(seed)
    if method == "xgboost":
        return [{"n_estimators": int(rng.randint(50, 251)), "max_depth": int(rng.randint(2, 6)),
                 "learning_rate": float(10 ** rng.uniform(-3, -1)),
                 "subsample": float(rng.uniform(0.7, 1)),
                 "colsample_bytree": float(rng.uniform(0.7, 1)),
                 "reg_alpha": float(10 ** rng.uniform(-3, 1)),
                 "reg_lambda": float(10 ** rng.uniform(-3, 1)),
                 "min_child_weight": int(rng.randint(1, 10))} for _ in range(n_iter or 10)]
    if method == "mlp":
        lrs, alphas = np.logspace(-4, -2, 5), np.logspace(-5, -2, 5)
        return [{"hidden_layer_sizes": MLP_HIDDEN[rng.randint(len(MLP_HIDDEN))],
                 "learning_rate_init": float(lrs[rng.randint(5)]),
                 "alpha": float(alphas[rng.randint(5)])} for _ in range(n_iter or 1)]
    raise ValueError(f"baseline method '{method}': expected one of {', '.join(METHODS)}")


def model(method: str, params: dict[str, Any], seed: int) -> Any:
    """A standardising pipeline around the method's estimator with ``params``."""
    if method == "pca":
        est: Any = make_pipeline(PCA(n_components=params["n_components"], random_state=seed),
                                 LogisticRegression(C=1.0, max_iter=1000, random_state=seed))
    elif method == "knn":
        est = KNeighborsClassifier(**params)
    elif method == "xgboost":
        from xgboost import XGBClassifier

        est = XGBClassifier(**params, random_state=seed, n_jobs=1, eval_metric="logloss")
    elif method == "mlp":
        est = MLPClassifier(**params, activation="relu", solver="adam", random_state=seed)
    else:
        raise ValueError(f"baseline method '{method}': expected one of {', '.join(METHODS)}")
    return make_pipeline(StandardScaler(), est)


def _fit_proba(make: Callable[[], Any], x_fit, y_fit, x_eval) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make().fit(x_fit, y_fit).predict_proba(x_eval)[:, 1]


def select(method: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
           y_test: np.ndarray, seed: int = 42, n_iter: int | None = None) -> Result:
    """Hyper-parameters by mean validation AUC, refit on all training rows, test metrics."""
    n, d = x_train.shape
    folds = engine.cv_splits(y_train, seed) if n > 3 else []
    grid = candidates(method, n, d, folds, seed, n_iter)
    if method == "pca":  # a fold has fewer rows than n: cap at what every fit can have
        smallest = min((len(tr) for tr, _ in folds), default=n)
        grid = [g for g in grid if g["n_components"] <= min(smallest, d)] or grid[:1]
    if not folds:
        best, val = grid[0], None
    else:
        means = []
        for params in grid:
            scores = []
            for tr, va in folds:
                if len(np.unique(y_train[tr])) < 2:
                    scores.append(0.5)
                    continue
                proba = _fit_proba(lambda p=params: model(method, p, seed), x_train[tr],
                                   y_train[tr], x_train[va])
                scores.append(roc_auc_score(y_train[va], proba))
            means.append(float(np.mean(scores)))
        i = int(np.argmax(means))
        best, val = grid[i], means[i]
    make = lambda: model(method, best, seed)
    proba = _fit_proba(make, x_train, y_train, x_test)
    if val is None:  # n <= 3: the training AUC, as the original's logistic branch
        train_proba = _fit_proba(make, x_train, y_train, x_train)
        val = float(roc_auc_score(y_train, train_proba)) if len(np.unique(y_train)) == 2 else 0.5
    m = _scores(y_test, proba, val, float("nan"))
    return Result(m.test_f1, m.test_acc, m.test_auc, m.val_auc, json.dumps(best))
