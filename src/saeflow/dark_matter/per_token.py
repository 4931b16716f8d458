"""Stage: per-token SAE error norms across widths, the tables behind Figures 6, 10a, 11 and 12.

``python -m saeflow.dark_matter.per_token --sae-ids ID... --sae-eval E.h5... --split S.h5...
[--fig6 tables/figure6.csv] [--fig10a tables/figure10a.csv] [--test-fraction 0.5] [--seed 0]
[--fig11 tables/figure11.csv] [--fig12 tables/figure12.csv] [--window-start 0]
[--window-length 100] [--tokenizer DIR] [--chunk-tokens 4096]``

Only the tables asked for are computed, so the workflow runs the regressions (Figures 6, 10a)
and the window (Figures 11, 12) as two jobs, and a change to the window reruns only the second.

The SAEs are the Dark Matter family's widths at one k (the headline k), all evaluated on the same
tokens. Per token and width W: ‖SaeError_W‖ (L2, not squared; from ``error_sq_norm`` of the
evaluation file) and the L2 norms of its linear and nonlinear parts (``split.h5`` of
:mod:`~saeflow.dark_matter.error_split`). As ``sae_power_laws_per_token.py`` of the original:

- **Figure 6** (``sae_per_token_predictability.pdf``): for every pair (i, j), the R² of
  regressing ‖err_j‖ on [‖err_i‖, 1]. A high R² across widths means that the tokens a small SAE
  reconstructs badly are the ones a large SAE reconstructs badly too.
- **Figure 10a** (``…_with_nonlinear_diff.pdf``): add ‖nonlinear_i‖ as a regressor and report
  the share of the remaining variance it explains, (R²_new − R²_orig)/(1 − R²_orig)·100 (0 where
  R²_orig = 1, as the original).
- **Figures 11 and 12** (``sae_power_laws_per_token_{with_magnification,broken_apart}.pdf``): the
  norms over a window of consecutive evaluation tokens (the original: tokens 10092–10192).

Rows. The nonlinear component is a residual of a regression fitted on the error split's train
rows, so on those rows it is an in-sample residual, smaller than on unseen rows. The per-token
regressions therefore use only the error split's held-out rows, split again with the same seeded
:func:`~saeflow.dark_matter.regression.split_mask` (``test_fraction``, ``seed``) into fit and
score rows. The original fitted on its first 150k shuffled rows with the nonlinear part taken
from a fit on those same rows.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.regression import F64, NormalEquations, R2Accumulator, predict, split_mask


class TokenNorms(NamedTuple):
    """Per-token L2 norms of one SAE's error and its two parts, and the error split's test rows."""

    error: np.ndarray  # [n] float64, ‖SaeError‖
    linear: np.ndarray  # [n] float64, ‖linear part‖
    nonlinear: np.ndarray  # [n] float64, ‖nonlinear part‖
    is_test: np.ndarray  # [n] bool, held out by the error split
    tokens: np.ndarray  # [n] int token ids
    width: int  # d_sae


def read_norms(eval_path: str, split_path: str, chunk: int) -> TokenNorms:
    """Read one SAE's per-token norms, checking that both files cover the same tokens."""
    with h5io.open_checked(eval_path, datasets={"error_sq_norm": (None,), "tokens": (None,)}) as ev:
        n = ev["error_sq_norm"].shape[0]
        error = np.sqrt(ev["error_sq_norm"][:].astype(np.float64))
        tokens = ev["tokens"][:]
        width = int(h5io.plain(ev.attrs["d_sae"]))
    with h5io.open_checked(split_path, datasets={"linear": (n, None), "nonlinear": (n, None),
                                                 "is_test": (n,), "tokens": (n,)}) as sp:
        if not np.array_equal(sp["tokens"][:], tokens):
            raise h5io.InputFileError(f"{split_path}: 'tokens' differ from {eval_path}")
        linear, nonlinear = np.empty(n), np.empty(n)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            linear[rows] = np.linalg.norm(sp["linear"][rows].astype(np.float64), axis=1)
            nonlinear[rows] = np.linalg.norm(sp["nonlinear"][rows].astype(np.float64), axis=1)
        is_test = sp["is_test"][:].astype(bool)
    return TokenNorms(error, linear, nonlinear, is_test, tokens, width)


def held_out_r2(x: Tensor, y: Tensor, fit: Tensor) -> Tensor:
    """R² per target column of least squares y [n, t] on [x, 1] (x [n, p]): fit on ``fit`` rows,
    scored on the others. Returns [t] float64."""
    normal = NormalEquations(x.shape[1], y.shape[1])
    normal.update(x[fit], y[fit])
    solution = normal.solve()
    score = R2Accumulator(y.shape[1])
    score.update(y[~fit], predict(solution, x[~fit]))
    return score.result().per_dim


def pairwise_r2(error: Tensor, nonlinear: Tensor, fit: Tensor) -> tuple[Tensor, Tensor]:
    """Held-out R² matrices [w, w] of ‖err_j‖ on [‖err_i‖, 1] and on [‖err_i‖, ‖nl_i‖, 1].

    error, nonlinear: [n, w] per-token norms (column = width); fit: [n] bool rows to fit on.
    Row i of each matrix is the predictor width, column j the target width.
    """
    w = error.shape[1]
    orig, new = torch.empty(w, w, dtype=F64), torch.empty(w, w, dtype=F64)
    for i in range(w):
        orig[i] = held_out_r2(error[:, i : i + 1], error, fit)
        both = torch.stack([error[:, i], nonlinear[:, i]], dim=1)
        new[i] = held_out_r2(both, error, fit)
    return orig, new


def improvement_percent(r2_orig: Tensor, r2_new: Tensor) -> Tensor:
    """(R²_new − R²_orig)/(1 − R²_orig)·100: the share of the unexplained variance the added
    regressor explains; 0 where R²_orig = 1 (nothing left to explain), as the original."""
    gap = 1 - r2_orig
    return torch.where(gap == 0, torch.zeros_like(gap), (r2_new - r2_orig) / gap * 100)


def predictability_tables(sae_ids: Sequence[str], norms: Sequence[TokenNorms], test_fraction: float,
                          seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long tables of Figure 6 (R²) and Figure 10a (improvement), one row per (x, y) pair."""
    held_out = norms[0].is_test
    rows = np.flatnonzero(held_out)
    fit = split_mask(len(rows), test_fraction, seed).logical_not()
    error = torch.from_numpy(np.stack([nm.error[rows] for nm in norms], 1))
    nonlinear = torch.from_numpy(np.stack([nm.nonlinear[rows] for nm in norms], 1))
    orig, new = pairwise_r2(error, nonlinear, fit)
    gain = improvement_percent(orig, new)
    w = len(norms)
    base = pd.DataFrame({
        "sae_x": np.repeat(sae_ids, w), "sae_y": np.tile(sae_ids, w),
        "width_x": np.repeat([nm.width for nm in norms], w),
        "width_y": np.tile([nm.width for nm in norms], w),
        "n_fit": int(fit.sum()), "n_test": int((~fit).sum()),
        "test_fraction": test_fraction, "seed": seed})
    fig6 = base.assign(r2=orig.flatten().numpy())
    fig10a = base.assign(r2_orig=orig.flatten().numpy(), r2_with_nonlinear=new.flatten().numpy(),
                         improvement_percent=gain.flatten().numpy())
    return fig6, fig10a


def window_table(sae_ids: Sequence[str], norms: Sequence[TokenNorms], start: int, length: int,
                 token_text: Sequence[str] | None) -> pd.DataFrame:
    """Norms over rows [start, start + length), one row per (token, SAE) (Figures 11, 12)."""
    n = len(norms[0].error)
    if not 0 <= start < n or length < 1:
        raise ValueError(f"window start {start}, length {length}: the evaluation corpus has {n} "
                         f"tokens (dark_matter.window_start must be in [0, {n}))")
    rows = np.arange(start, min(start + length, n))
    parts = []
    for sae_id, nm in zip(sae_ids, norms):
        parts.append(pd.DataFrame({
            "offset": rows - start, "row": rows, "token": nm.tokens[rows],
            "token_text": list(token_text) if token_text is not None else "",
            "sae_id": sae_id, "width": nm.width, "error_norm": nm.error[rows],
            "linear_norm": nm.linear[rows], "nonlinear_norm": nm.nonlinear[rows],
            "error_split_test_row": nm.is_test[rows]}))
    return pd.concat(parts, ignore_index=True)


def check_aligned(sae_ids: Sequence[str], paths: Sequence[str], norms: Sequence[TokenNorms]) -> None:
    """All SAEs must share tokens and the error split's held-out rows (same seed and fraction)."""
    for sae_id, path, nm in zip(sae_ids[1:], paths[1:], norms[1:]):
        if not np.array_equal(nm.tokens, norms[0].tokens):
            raise h5io.InputFileError(f"{path} ({sae_id}): tokens differ from {paths[0]}")
        if not np.array_equal(nm.is_test, norms[0].is_test):
            raise h5io.InputFileError(f"{path} ({sae_id}): held-out rows differ from {paths[0]}; "
                                      "the error splits used another seed or test fraction")


def decode(tokenizer_dir: str | None, tokens: np.ndarray) -> list[str] | None:
    """Token strings for the window's labels (None without a tokenizer)."""
    if not tokenizer_dir:
        return None
    from transformers import AutoTokenizer  # heavy import, only when labels are wanted

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer.decode([int(t)]) for t in tokens]


def run(args: argparse.Namespace) -> None:
    if not len(args.sae_ids) == len(args.sae_eval) == len(args.split) >= 2:
        raise ValueError("--sae-ids, --sae-eval and --split need the same length, at least 2")
    norms = [read_norms(e, s, args.chunk_tokens) for e, s in zip(args.sae_eval, args.split)]
    check_aligned(args.sae_ids, args.split, norms)
    order = np.argsort([nm.width for nm in norms], kind="stable")
    sae_ids, norms = [args.sae_ids[i] for i in order], [norms[i] for i in order]
    outputs = []
    if args.fig6 or args.fig10a:
        fig6, fig10a = predictability_tables(sae_ids, norms, args.test_fraction, args.seed)
        outputs += [(fig6, args.fig6), (fig10a, args.fig10a)]
    if args.fig11 or args.fig12:
        stop = min(args.window_start + args.window_length, len(norms[0].tokens))
        text = decode(args.tokenizer, norms[0].tokens[args.window_start:stop])
        window = window_table(sae_ids, norms, args.window_start, args.window_length, text)
        outputs += [(window, args.fig11), (window, args.fig12)]
    for table, path in outputs:
        if path:
            with h5io.atomic_path(path) as tmp:
                table.to_csv(tmp, index=False, float_format="%.10g")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.per_token", __doc__)
    p.add_argument("--sae-ids", nargs="+", required=True, help="SAEs of one k, any order")
    p.add_argument("--sae-eval", nargs="+", required=True, help="their evaluation files (.h5)")
    p.add_argument("--split", nargs="+", required=True, help="their error-split files (.h5)")
    for fig in ("6", "10a", "11", "12"):
        p.add_argument(f"--fig{fig}", default=None, help=f"table of Figure {fig} (.csv)")
    p.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of the error split's held-out rows that score the regressions")
    p.add_argument("--seed", type=int, default=0, help="seed of that split")
    p.add_argument("--window-start", type=int, default=0, help="first token row of the window")
    p.add_argument("--window-length", type=int, default=100, help="tokens in the window")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, for token labels")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="rows read at once")
    args = p.parse_args(argv)
    if not any((args.fig6, args.fig10a, args.fig11, args.fig12)):
        p.error("give at least one of --fig6, --fig10a, --fig11, --fig12")
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.window_start < 0 or args.window_length < 1 or args.chunk_tokens < 1:
        p.error("--window-start must be >= 0, --window-length and --chunk-tokens >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(1)
    run(parse_args(argv))


if __name__ == "__main__":
    main()
