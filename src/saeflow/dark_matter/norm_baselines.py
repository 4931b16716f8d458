"""Stage: predicting an SAE's error norm from x, against simple baselines (Figure 13).

``python -m saeflow.dark_matter.norm_baselines fit --acts A.h5 --sae-eval E.h5 --lm-loss L.h5
--out B.json --sae-id ID --site S [--k K] [--test-fraction 0.5] [--seed 0] [--chunk-tokens 4096]``

``python -m saeflow.dark_matter.norm_baselines table --inputs B.json... --out tables/figure13.csv``

Target: ‖SaeError‖² per token (``error_sq_norm``; the original's ``sae_error_norms``, squared
despite the name). Held-out R² of five predictors, as ``compare_norm_prediction_to_baselines.py``:

============  ==========================================================================
predictor     prediction
============  ==========================================================================
acts          least squares on [x, 1]
token         mean target of the token id over the fit rows (unseen ids: the fit rows'
              global mean); the original took means over *all* rows, the scored ones included
model_loss    least squares on [the model's next-token loss at this position, 1]
l0            least squares on [the SAE's L0 on this token, 1]
act_norm      least squares on [‖x‖, 1]
============  ==========================================================================

Rows: the error split's seeded split (``test_fraction``, ``seed``, the same
:func:`~saeflow.dark_matter.regression.split_mask`), restricted to tokens that have a
next-token loss (the last position of each sequence has none; the original dropped it too), so
all five predictors are scored on the same rows. ``table`` gathers one row per (SAE, predictor);
the original swept layers 0–39 with one SAE each, here the SAEs listed in the config.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.norm_prediction import gather, sae_meta, streamed_fit
from saeflow.dark_matter.per_token import held_out_r2
from saeflow.dark_matter.regression import F64, R2Accumulator, split_mask

PREDICTORS = ("acts", "token", "model_loss", "l0", "act_norm")
LABELS = {"acts": "Acts", "token": "Token mean", "model_loss": "Model loss", "l0": "L0",
          "act_norm": "Act norm"}


def token_means(tokens_fit: Tensor, y_fit: Tensor, tokens_query: Tensor) -> Tensor:
    """Predict y for ``tokens_query`` [q] by the mean of y_fit [m] over the fit rows with the same
    token id (tokens_fit [m]); ids absent from the fit rows get the mean of y_fit. [q] float64.

    Only fit rows enter, so a scored row never contributes to its own prediction (the original
    averaged over all rows, the scored ones included).
    """
    tok_fit, y_fit = tokens_fit.long(), y_fit.to(F64)
    size = int(max(tok_fit.max(), tokens_query.max())) + 1
    sums = torch.zeros(size, dtype=F64).index_add_(0, tok_fit, y_fit)
    counts = torch.bincount(tok_fit, minlength=size).to(F64)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), y_fit.mean())
    return means[tokens_query.long()]


def token_mean_r2(tokens: Tensor, y: Tensor, fit: Tensor) -> float:
    """Held-out R² of :func:`token_means` on y [n], fitted on the ``fit`` rows [n] bool."""
    score = R2Accumulator(1)
    pred = token_means(tokens[fit], y[fit], tokens[~fit])
    score.update(y[~fit, None].to(F64), pred[:, None])
    return score.result().pooled


def loss_per_row(lm_loss: h5io.H5File, acts: h5io.H5File, path: str) -> np.ndarray:
    """The next-token loss at each activation row (NaN at a sequence's last position).

    Rows are positions ``skip_positions .. ctx_len-1`` of each sequence, sequence-major; the loss
    file holds ``loss`` [n_seq, ctx_len-1], loss[s, p] predicting token p+1.
    """
    attrs = {key: h5io.plain(acts.attrs[key]) for key in ("ctx_len", "skip_positions")}
    ctx, skip = attrs["ctx_len"], attrs["skip_positions"]
    n = acts["tokens"].shape[0]
    loss = lm_loss["loss"]
    if loss.shape[1] != ctx - 1 or loss.shape[0] * (ctx - skip) != n:
        raise h5io.InputFileError(f"{path}: 'loss' has shape {loss.shape}; the activations "
                                  f"({acts.filename}) need [{n // (ctx - skip)}, {ctx - 1}]")
    if not np.array_equal(lm_loss["tokens"][:, skip:].reshape(-1), acts["tokens"][:]):
        raise h5io.InputFileError(f"{path}: 'tokens' differ from {acts.filename}")
    padded = np.concatenate([loss[:], np.full((loss.shape[0], 1), np.nan, np.float32)], axis=1)
    return padded[:, skip:].reshape(-1).astype(np.float64)


def fit_baselines(acts_path: str, eval_path: str, loss_path: str, test_fraction: float,
                  seed: int, chunk: int) -> dict:
    """Held-out R² of each predictor of ‖SaeError‖², on rows that have a model loss."""
    acts = h5io.open_checked(acts_path, datasets={"acts": (None, None), "tokens": (None,)})
    n, d = acts["acts"].shape
    with acts, h5io.open_checked(eval_path, datasets={
            "error_sq_norm": (n,), "l0": (n,), "act_norm": (n,), "tokens": (n,)}) as ev, \
            h5io.open_checked(loss_path, datasets={"loss": (None, None),
                                                   "tokens": (None, None)}) as lm:
        if not np.array_equal(ev["tokens"][:], acts["tokens"][:]):
            raise h5io.InputFileError(f"{eval_path}: 'tokens' differ from {acts_path}")
        loss = torch.from_numpy(loss_per_row(lm, acts, loss_path))
        y = torch.from_numpy(ev["error_sq_norm"][:].astype(np.float64))[:, None]
        valid, is_test = loss.isfinite(), split_mask(n, test_fraction, seed)

        def chunks() -> Iterator[tuple[slice, Tensor, Tensor]]:
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                yield rows, torch.from_numpy(acts["acts"][rows]), y[rows]

        _, acts_r2, n_fit = streamed_fit(chunks, valid & ~is_test, valid & is_test, d, 1)
        small = {"model_loss": loss, "l0": torch.from_numpy(ev["l0"][:].astype(np.float64)),
                 "act_norm": torch.from_numpy(ev["act_norm"][:].astype(np.float64))}
        tokens = torch.from_numpy(ev["tokens"][:].astype(np.int64))
    fit = ~is_test[valid]
    r2 = {"acts": acts_r2.pooled, "token": token_mean_r2(tokens[valid], y[valid, 0], fit)}
    for name, column in small.items():
        r2[name] = float(held_out_r2(column[valid, None], y[valid], fit)[0])
    return {"r2": {p: r2[p] for p in PREDICTORS}, "n_fit": n_fit, "n_test": acts_r2.n,
            "test_fraction": test_fraction, "seed": seed}


def _parser() -> argparse.ArgumentParser:
    p = cli.stage_parser("saeflow.dark_matter.norm_baselines", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="one SAE's held-out R² per predictor")
    f.add_argument("--acts", required=True, help="activations at the SAE's site (.h5)")
    f.add_argument("--sae-eval", required=True, help="the SAE's evaluation file (.h5)")
    f.add_argument("--lm-loss", required=True, help="the model's per-token loss (lm_loss.h5)")
    f.add_argument("--out", required=True, help="R² per predictor (.json)")
    f.add_argument("--sae-id", required=True)
    f.add_argument("--site", required=True, help="hook site of the SAE")
    f.add_argument("--k", type=int, default=None, help="the SAE's k, if it has one")
    f.add_argument("--test-fraction", type=float, default=0.5, help="held-out share of rows")
    f.add_argument("--seed", type=int, default=0, help="seed of the split")
    f.add_argument("--chunk-tokens", type=int, default=4096, help="rows read at once")
    t = sub.add_parser("table", help="Figure 13's table from the per-SAE files")
    t.add_argument("--inputs", nargs="+", required=True, help="per-SAE .json files")
    t.add_argument("--out", required=True, help="tables/figure13.csv")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(1)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "fit":
        if not 0 < args.test_fraction < 1 or args.chunk_tokens < 1:
            parser.error("--test-fraction must be in (0, 1) and --chunk-tokens >= 1")
        result = fit_baselines(args.acts, args.sae_eval, args.lm_loss, args.test_fraction,
                               args.seed, args.chunk_tokens)
        meta = sae_meta(args.sae_eval, args.sae_id, args.site, args.k)
        h5io.write_json(args.out, {**meta, **result})
        return
    table = gather(args.inputs, "predictor", PREDICTORS)
    table["label"] = table.predictor.map(LABELS)
    with h5io.atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")


if __name__ == "__main__":
    main()
