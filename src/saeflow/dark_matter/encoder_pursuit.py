"""Stage: how much of an SAE's error is its encoder's fault (gradient pursuit on its own decoder).

``python -m saeflow.dark_matter.encoder_pursuit --sae DIR --acts A.h5 --sae-eval E.h5
--out P.json [--tokens 32768] [--test-fraction 0.5] [--seed 0] [--chunk-tokens 256]
[--read-chunk-tokens 4096] [--threads 0]``

The Dark Matter paper (Section 5, stage 3 of ``encoder_pursuit.py``) re-encodes each token with
non-negative gradient pursuit (:mod:`saeflow.dark_matter.pursuit`) on the SAE's *decoder*, taking
as many atoms as the SAE itself used on that token (the evaluation file's ``l0``). What pursuit
removes from the error is "encoder error"; the rest is down to the dictionary.

Rows. Pursuit runs on a seeded subset of ``min(--tokens, n)`` evaluation rows (all rows when
``--tokens >= n``). The train/test split is the one the error-split stage uses:
``split_mask(n, --test-fraction, --seed)`` on all ``n`` rows, restricted to the subset. The
"pursuit nonlinear FVU" fits the linear prediction of PursuitError(x) = x - Pursuit(x) from
[x, 1] on the subset's train rows and scores the subset's test rows, exactly as
:mod:`saeflow.dark_matter.error_split` does for the SAE's own error. The SAE's error is regressed
on the same rows in the same solve, so the two nonlinear FVUs below compare like with like even
when the subset is smaller than the evaluation set (a smaller fit set alone raises test FVU).

Output ``P.json`` (FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows named):

``fvu_sae``, ``fvu_pursuit``                 all subset rows
``fvu_sae_test``, ``fvu_pursuit_test``       subset test rows
``fvu_nonlinear_sae``                        subset test rows, Sae(x) + linear prediction of its error
``fvu_nonlinear_pursuit``                    subset test rows, Pursuit(x) + linear prediction of its error
``r2_pursuit_error``, ``r2_sae_error``       pooled held-out R² of those error predictions
``pursuit_worse_fraction``                   subset rows where ||PursuitError||² > ||SaeError||²
``mean_target_l0``, ``mean_pursuit_l0``      atoms asked for and used (pursuit stops early on a
                                             token with no positively correlated atom left)
plus ``n_rows_eval``, ``n_rows``, ``n_train``, ``n_test``, ``seed``, ``test_fraction``, inputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.error_split import iter_chunks, open_inputs
from saeflow.dark_matter.pursuit import gradient_pursuit
from saeflow.dark_matter.regression import F64, NormalEquations, R2Accumulator, predict, split_mask
from saeflow.saes import load_sae


class PursuitRows(NamedTuple):
    """The evaluation rows pursuit runs on, with what it needs of each."""

    rows: np.ndarray  # [m] int64, sorted row ids into the evaluation file
    x: Tensor  # [m, d] float32 activations
    sae_error: Tensor  # [m, d] float32, SaeError = x - Sae(x)
    l0: Tensor  # [m] int64, the SAE's L0 on each row
    is_test: Tensor  # [m] bool, the error-split stage's test rows


def pursuit_subset(n: int, tokens: int, seed: int) -> np.ndarray:
    """Sorted ids of a seeded subset of ``min(tokens, n)`` of ``n`` rows (all rows if tokens >= n).

    Drawn from a numpy stream keyed on (seed, 1), independent of :func:`split_mask`'s torch
    permutation: reusing that permutation would pick test rows only.
    """
    if tokens >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(n, size=tokens, replace=False)).astype(np.int64)


def read_rows(acts_path: str, eval_path: str, tokens: int, test_fraction: float, seed: int,
              chunk: int) -> tuple[PursuitRows, int]:
    """Stream both files once (checking they hold the same tokens) and keep the subset's rows."""
    acts, sae_eval = open_inputs(acts_path, eval_path)
    with acts, sae_eval:
        n = acts["acts"].shape[0]
        if sae_eval["l0"].shape != (n,):
            raise h5io.InputFileError(f"{eval_path}: dataset 'l0' has shape "
                                      f"{sae_eval['l0'].shape}, expected ({n},)")
        rows = pursuit_subset(n, tokens, seed)
        keep = np.zeros(n, dtype=bool)
        keep[rows] = True
        xs, errs = [], []
        for span, x, sae_error in iter_chunks(acts, sae_eval, chunk):
            mask = torch.from_numpy(keep[span])
            xs.append(x[mask])
            errs.append(sae_error[mask])
        l0 = torch.from_numpy(sae_eval["l0"][:][rows].astype(np.int64))
    is_test = split_mask(n, test_fraction, seed)[torch.from_numpy(rows)]
    return PursuitRows(rows, torch.cat(xs), torch.cat(errs), l0, is_test), n


def decoder(sae) -> tuple[Tensor, Tensor]:
    """(W_dec [d_sae, d], b_dec [d]) of an SAE whose decode is latents @ W_dec + b_dec."""
    cfg = sae.cfg
    norm = getattr(cfg, "normalize_activations", "none")
    reshape = getattr(cfg, "reshape_activations", "none")
    if norm != "none" or reshape != "none":
        raise ValueError(f"encoder pursuit needs decode(z) = z @ W_dec + b_dec; this SAE has "
                         f"normalize_activations={norm!r}, reshape_activations={reshape!r}")
    return sae.W_dec.detach().float(), sae.b_dec.detach().float()


def total_ss(x: Tensor) -> float:
    """sum ||x - mean(x)||^2 over rows [m, d], in float64: the FVU denominator."""
    x64 = x.to(F64)
    return float((x64 - x64.mean(0)).square().sum())


def pursuit_metrics(x: Tensor, sae_error: Tensor, pursuit_error: Tensor,
                    is_test: Tensor) -> dict[str, float | str]:
    """FVUs and held-out nonlinear FVUs of the SAE and of pursuit on the same rows.

    x, sae_error, pursuit_error [m, d]; is_test [m] bool (both halves must be non-empty).
    The two error regressions share one Gram matrix: targets [SaeError, PursuitError] [m, 2d].
    """
    d = x.shape[1]
    train, test = ~is_test, is_test
    if not bool(train.any()) or not bool(test.any()):
        raise ValueError(f"need train and test rows, got {int(train.sum())} and {int(test.sum())}")
    both = torch.cat([sae_error, pursuit_error], dim=1)
    normal = NormalEquations(d, 2 * d)
    normal.update(x[train], both[train])
    fit = normal.solve()
    pred = predict(fit, x[test])
    ss_all, ss_test = total_ss(x), total_ss(x[test])
    out: dict[str, float | str] = {}
    parts = [("sae", sae_error, slice(0, d)), ("pursuit", pursuit_error, slice(d, 2 * d))]
    for name, err, cols in parts:
        err64, err_test = err.to(F64), err[test].to(F64)
        resid = err_test - pred[:, cols]
        r2 = R2Accumulator(d)
        r2.update(err_test, pred[:, cols])
        out[f"fvu_{name}"] = float(err64.square().sum()) / ss_all
        out[f"fvu_{name}_test"] = float(err_test.square().sum()) / ss_test
        out[f"fvu_nonlinear_{name}"] = float(resid.square().sum()) / ss_test
        out[f"r2_{name}_error"] = r2.result().pooled
    worse = pursuit_error.to(F64).square().sum(1) > sae_error.to(F64).square().sum(1)
    out["pursuit_worse_fraction"] = float(worse.double().mean())
    out["solver"] = fit.solver
    return out


def run(args: argparse.Namespace) -> dict:
    """Read the subset, run pursuit on the SAE's decoder, write and return the metrics."""
    sae = load_sae(args.sae)
    w_dec, b_dec = decoder(sae)
    data, n = read_rows(args.acts, args.sae_eval, args.tokens, args.test_fraction, args.seed,
                        args.read_chunk_tokens)
    if data.x.shape[1] != w_dec.shape[1]:
        raise h5io.InputFileError(f"{args.acts}: activations have d = {data.x.shape[1]}, the SAE "
                                  f"in {args.sae} reads d = {w_dec.shape[1]}")
    with torch.inference_mode():
        result = gradient_pursuit(w_dec, b_dec, data.x, data.l0, args.chunk_tokens)
    pursuit_error = data.x - result.reconstruction
    metrics = pursuit_metrics(data.x, data.sae_error, pursuit_error, data.is_test)
    metrics |= {
        "sae_id": args.sae_id or Path(args.sae).name,
        "sae": str(args.sae), "acts_file": str(args.acts), "sae_eval_file": str(args.sae_eval),
        "n_rows_eval": n, "n_rows": len(data.rows), "n_test": int(data.is_test.sum()),
        "n_train": int((~data.is_test).sum()), "tokens_requested": args.tokens,
        "seed": args.seed, "test_fraction": args.test_fraction,
        "mean_target_l0": float(data.l0.double().mean()),
        "mean_pursuit_l0": float((result.indices >= 0).sum(1).double().mean()),
    }
    h5io.write_json(args.out, metrics)
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.encoder_pursuit", __doc__)
    p.add_argument("--sae", required=True, help="SAE folder in the SAELens layout")
    p.add_argument("--acts", required=True, help="activations file at the SAE's site (.h5)")
    p.add_argument("--sae-eval", required=True, help="SAE evaluation file on those activations")
    p.add_argument("--out", required=True, help="pursuit metrics (.json)")
    p.add_argument("--sae-id", default="", help="recorded in the output")
    p.add_argument("--tokens", type=int, default=32768,
                   help="evaluation rows to run pursuit on (a seeded subset; all if >= n)")
    p.add_argument("--test-fraction", type=float, default=0.5,
                   help="held-out fraction of the error-split stage's split (0 < f < 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the subset")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per pursuit batch")
    p.add_argument("--read-chunk-tokens", type=int, default=4096, help="rows per file read")
    cli.add_threads(p)
    args = p.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if min(args.tokens, args.chunk_tokens, args.read_chunk_tokens) < 1:
        p.error("--tokens, --chunk-tokens and --read-chunk-tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run)


if __name__ == "__main__":
    main()
