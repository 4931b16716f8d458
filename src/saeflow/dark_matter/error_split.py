"""Stage: split an SAE's error into the part linearly predictable from x and the rest.

``python -m saeflow.dark_matter.error_split --acts A.h5 --sae-eval E.h5 --out S.h5 --fit F.h5
--metrics M.json [--test-fraction 0.5] [--seed 0] [--chunk-tokens 4096] [--ridge 0]
[--no-intercept] [--threads 0]``

Signs. The evaluation file (:mod:`saeflow.sae_eval`) stores ``error = Sae(x) - x``, the sign of
the original's ``sae_error_vecs``. This stage uses the paper's SaeError(x) = x - Sae(x) = -error
and fits, on the train rows of a seeded split, with a bias column (the original had none)::

    linear(x)    = x @ weight + bias          ≈ SaeError(x)
    nonlinear(x) = SaeError(x) - linear(x)
    x            = Sae(x) + linear(x) + nonlinear(x)

so Sae(x) + linear(x) is the improved reconstruction whose FVU is the "nonlinear FVU", and its
residual is exactly nonlinear(x). Both passes stream the files in chunks (O(d²) memory).

Outputs (each written to a temporary name and renamed when complete):

``F.h5``  ``weight`` float64 [d, d], ``bias`` float64 [d]: SaeError ≈ x @ weight + bias;
          ``norm_weight`` float64 [d], ``norm_bias`` float64 []: ‖SaeError‖² ≈ x @ nw + nb;
          attrs: inputs, split, ridge, intercept, solver, n_train.
``S.h5``  ``linear`` float32 [n, d], ``nonlinear`` float32 [n, d], ``is_test`` bool [n],
          ``tokens`` int32 [n] (copied from the activations file).
``M.json`` on the test rows (the original scored "nonlinear FVU" on all rows, training rows
          included): ``r2_per_dim`` (list), ``r2_mean``, ``r2_pooled`` of SaeError from x;
          ``norm_r2`` of ‖SaeError‖² from x; ``fvu_sae`` of Sae(x); ``fvu_nonlinear`` of
          Sae(x) + linear(x); ``linear_norm_fraction`` = Σ‖linear‖² / Σ‖SaeError‖² and
          ``nonlinear_norm_fraction`` = Σ‖nonlinear‖² / Σ‖SaeError‖² (they sum to about 1, as
          the two parts are nearly orthogonal on held-out rows); in-sample ``r2_train_mean`` /
          ``r2_train_pooled``; ``fvu_sae_all_rows`` (equals the evaluation's metrics.json FVU).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.regression import (
    F64,
    LinearFit,
    NormalEquations,
    R2Accumulator,
    predict,
    r2_result,
    split_mask,
)


def open_inputs(acts_path: str, eval_path: str) -> tuple[h5io.H5File, h5io.H5File]:
    """Open and check the activations and evaluation files (same rows, same width)."""
    acts = h5io.open_checked(acts_path, datasets={"acts": (None, None), "tokens": (None,)})
    n, d = acts["acts"].shape
    try:
        sae_eval = h5io.open_checked(eval_path, datasets={"error": (n, d), "tokens": (n,)})
    except Exception:
        acts.close()
        raise
    return acts, sae_eval


def iter_chunks(acts: h5io.H5File, sae_eval: h5io.H5File,
                chunk: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(rows, x [m, d], SaeError = x - Sae(x) = -error [m, d]) per chunk, float32.

    Checks that both files hold the same tokens in the same order, chunk by chunk.
    """
    n = acts["acts"].shape[0]
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        if not np.array_equal(acts["tokens"][rows], sae_eval["tokens"][rows]):
            raise h5io.InputFileError(
                f"{sae_eval.filename}: 'tokens' differ from {acts.filename} in rows "
                f"{rows.start}:{rows.stop}; the evaluation was made on other activations")
        x = torch.from_numpy(acts["acts"][rows])
        yield rows, x, -torch.from_numpy(sae_eval["error"][rows])


def targets(sae_error: Tensor) -> Tensor:
    """[SaeError, ‖SaeError‖²] [m, d + 1] float64: both regressions share one Gram matrix XᵀX."""
    err = sae_error.to(F64)
    return torch.cat([err, err.square().sum(1, keepdim=True)], dim=1)


def fit_error_regression(acts: h5io.H5File, sae_eval: h5io.H5File, is_test: Tensor,
                         chunk: int) -> NormalEquations:
    """Accumulate the normal equations of [SaeError, ‖SaeError‖²] on x over the train rows."""
    d = acts["acts"].shape[1]
    normal = NormalEquations(d, d + 1)
    for rows, x, sae_error in iter_chunks(acts, sae_eval, chunk):
        train = ~is_test[rows]
        normal.update(x[train], targets(sae_error[train]))
    return normal


def split_fit(fit: LinearFit) -> tuple[LinearFit, LinearFit]:
    """The joint fit of [SaeError, ‖SaeError‖²] as (vector fit, norm fit)."""
    return (LinearFit(fit.weight[:, :-1], fit.bias[:-1], fit.solver),
            LinearFit(fit.weight[:, -1:], fit.bias[-1:], fit.solver))


class _Scores:
    """Test-row (and all-row) accumulators for the metrics file."""

    def __init__(self, d: int) -> None:
        self.vector, self.norm = R2Accumulator(d), R2Accumulator(1)
        self.sae, self.sae_all = R2Accumulator(d), R2Accumulator(d)
        self.sq = {"error": 0.0, "linear": 0.0, "nonlinear": 0.0}

    def update(self, x: Tensor, sae_error: Tensor, pred: Tensor, test: Tensor) -> None:
        """x, sae_error [m, d] float32; pred [m, d + 1] float64; test [m] bool."""
        self.sae_all.update(x, x - sae_error)
        x, err, pred = x[test].to(F64), sae_error[test].to(F64), pred[test]
        linear = pred[:, :-1]
        self.vector.update(err, linear)
        self.norm.update(err.square().sum(1, keepdim=True), pred[:, -1:])
        self.sae.update(x, x - err)
        for key, part in [("error", err), ("linear", linear), ("nonlinear", err - linear)]:
            self.sq[key] += float(part.square().sum())

    def result(self) -> dict:
        vector, sae = self.vector.result(), self.sae.result()
        return {
            "r2_per_dim": [float(v) for v in vector.per_dim],
            "r2_mean": vector.mean, "r2_pooled": vector.pooled,
            "norm_r2": self.norm.result().pooled,
            "fvu_sae": sae.fvu,
            "fvu_nonlinear": self.sq["nonlinear"] / float(sae.ss_tot.sum()),
            "linear_norm_fraction": self.sq["linear"] / self.sq["error"],
            "nonlinear_norm_fraction": self.sq["nonlinear"] / self.sq["error"],
            "fvu_sae_all_rows": self.sae_all.result().fvu,
            "n_test": vector.n,
        }


def write_split(acts: h5io.H5File, sae_eval: h5io.H5File, fit: LinearFit, is_test: Tensor,
                chunk: int, out: str, attrs: dict) -> dict:
    """Second pass: write linear / nonlinear components to ``out``; return test-row metrics."""
    n, d = acts["acts"].shape
    scores = _Scores(d)
    with h5io.atomic_path(out) as tmp, h5io.H5File(tmp, "w") as h5:
        for name in ("linear", "nonlinear"):
            h5.create_dataset(name, (n, d), "float32", chunks=(max(1, min(chunk, n)), d))
        h5["is_test"] = is_test.numpy()
        h5["tokens"] = acts["tokens"][:]
        for rows, x, sae_error in iter_chunks(acts, sae_eval, chunk):
            pred = predict(fit, x)  # [m, d + 1]: SaeError and ‖SaeError‖² predictions
            linear = pred[:, :-1].float()
            h5["linear"][rows] = linear.numpy()
            h5["nonlinear"][rows] = (sae_error - linear).numpy()
            scores.update(x, sae_error, pred, is_test[rows])
        h5io.write_attrs(h5, attrs)
        h5io.mark_complete(h5)
    return scores.result()


def write_fit(path: str, fit: LinearFit, attrs: dict) -> None:
    """The vector and norm regressions, float64, with provenance attributes."""
    vector, norm = split_fit(fit)
    with h5io.atomic_path(path) as tmp, h5io.H5File(tmp, "w") as h5:
        h5["weight"], h5["bias"] = vector.weight.numpy(), vector.bias.numpy()
        h5["norm_weight"] = norm.weight[:, 0].numpy()
        h5["norm_bias"] = float(norm.bias[0])
        h5io.write_attrs(h5, {**attrs, "solver": fit.solver,
                              "convention": "SaeError = x - Sae(x) ~ x @ weight + bias"})
        h5io.mark_complete(h5)


def run(args: argparse.Namespace) -> dict:
    """Fit on the train rows, write the fit, the split and the metrics; return the metrics."""
    acts, sae_eval = open_inputs(args.acts, args.sae_eval)
    with acts, sae_eval:
        n = acts["acts"].shape[0]
        is_test = split_mask(n, args.test_fraction, args.seed)
        n_test = int(is_test.sum())
        if n_test == 0 or n_test == n:
            raise ValueError(f"--test-fraction {args.test_fraction} on {n} rows leaves "
                             f"{n - n_test} train and {n_test} test rows; both must be > 0")
        normal = fit_error_regression(acts, sae_eval, is_test, args.chunk_tokens)
        fit = normal.solve(args.ridge, intercept=not args.no_intercept)
        joint = normal.r2(fit)  # in-sample; the last output is the norm regression
        train_r2 = r2_result(joint.ss_res[:-1], joint.ss_tot[:-1], joint.n)
        attrs = {"acts_file": str(args.acts), "sae_eval_file": str(args.sae_eval),
                 "sae_id": h5io.plain(sae_eval.attrs.get("sae_id", "")),
                 "test_fraction": args.test_fraction, "seed": args.seed, "ridge": args.ridge,
                 "intercept": int(not args.no_intercept), "n_train": normal.n}
        write_fit(args.fit, fit, attrs)
        metrics = write_split(acts, sae_eval, fit, is_test, args.chunk_tokens, args.out, attrs)
    metrics |= {**attrs, "n_tokens": n, "solver": fit.solver,
                "r2_train_mean": train_r2.mean, "r2_train_pooled": train_r2.pooled}
    h5io.write_json(args.metrics, metrics)
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.error_split", __doc__)
    p.add_argument("--acts", required=True, help="activations file at the SAE's site (.h5)")
    p.add_argument("--sae-eval", required=True, help="SAE evaluation file on those activations")
    p.add_argument("--out", required=True, help="per-token linear / nonlinear components (.h5)")
    p.add_argument("--fit", required=True, help="fitted regressions (.h5)")
    p.add_argument("--metrics", required=True, help="test-row metrics (.json)")
    p.add_argument("--test-fraction", type=float, default=0.5,
                   help="fraction of token rows held out for the metrics (0 < f < 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="rows per streamed chunk")
    p.add_argument("--ridge", type=float, default=0.0,
                   help="added to the diagonal of the centred Gram matrix (0: plain OLS)")
    p.add_argument("--no-intercept", action="store_true",
                   help="fit without a bias column, as the original code did")
    cli.add_threads(p)
    args = p.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.chunk_tokens < 1 or args.ridge < 0:
        p.error("--chunk-tokens must be >= 1 and --ridge >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run)


if __name__ == "__main__":
    main()
