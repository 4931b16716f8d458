"""Stage: predicting an SAE's error from other sites' reconstructions (Figure 10b).

``python -m saeflow.dark_matter.cross_site --target-eval E.h5 --target-split S.h5
--source NAME ACTS EVAL SPLIT [--source ...] --out R.csv [--test-fraction 0.5] [--seed 0]
[--chunk-tokens 4096]``

The original (``simple_circuits.py``) asks whether the dark matter of the layer-20 residual SAE
can be read off earlier parts of the computation. For the target SAE (at the residual stream of
layer L) the targets are its SaeError = x - Sae(x), its nonlinear error and its linear error
(:mod:`~saeflow.dark_matter.error_split`); for each source site (the residual stream at L itself,
at L-1, the MLP output and the attention output of layer L, each with its own SAE) the
predictors are, one at a time,

``act``            the source activation x_s
``sae_rec``        its SAE's reconstruction Sae_s(x_s) = x_s + error_s
``linear_err``     the linear part of its SAE's error
``nonlinear_err``  the nonlinear part of its SAE's error

Each (source, predictor) fits every target at once by least squares with a bias column, streamed
in float64 on the train rows of the same seeded split as the error split, and is scored on the
held-out rows: ``r2`` is the mean over dims of 1 - SSres/SStot (the original's
``calculate_r_squared``), ``r2_pooled`` is 1 - FVU. The original used ``attn.hook_z`` (heads ×
d_head) for attention; saeflow's attention site is the attention output (``hook_attn_out``),
the same information after the output projection. All files must hold the same tokens in the
same order (activations of one model on one corpus).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.regression import (
    NormalEquations,
    R2Accumulator,
    predict,
    r2_result,
    split_mask,
)

PREDICTORS = ("act", "sae_rec", "linear_err", "nonlinear_err")
TARGETS = ("sae_error", "nonlinear_error", "linear_error")


@dataclass
class Source:
    """One source site: its activations, its SAE's evaluation file and error split."""

    name: str
    acts: h5io.H5File
    sae_eval: h5io.H5File
    split: h5io.H5File


def predictors(src: Source, rows: slice) -> dict[str, Tensor]:
    """The four predictors of a source on ``rows``, each [m, d_s] float32."""
    x = torch.from_numpy(src.acts["acts"][rows])
    return {"act": x, "sae_rec": x + torch.from_numpy(src.sae_eval["error"][rows]),
            "linear_err": torch.from_numpy(src.split["linear"][rows]),
            "nonlinear_err": torch.from_numpy(src.split["nonlinear"][rows])}


def targets(sae_eval: h5io.H5File, split: h5io.H5File, rows: slice) -> Tensor:
    """[SaeError, nonlinear, linear] of the target SAE on ``rows``, [m, 3d] float32."""
    sae_error = -torch.from_numpy(sae_eval["error"][rows])  # the file stores Sae(x) - x
    return torch.cat([sae_error, torch.from_numpy(split["nonlinear"][rows]),
                      torch.from_numpy(split["linear"][rows])], dim=1)


def open_sources(stack: ExitStack, specs: Sequence[Sequence[str]], n: int,
                 tokens: np.ndarray) -> list[Source]:
    """Open and check each source's three files: n rows each, the target's tokens."""
    sources = []
    for name, acts_path, eval_path, split_path in specs:
        acts = stack.enter_context(h5io.open_checked(acts_path, datasets={"acts": (n, None),
                                                                          "tokens": (n,)}))
        d = acts["acts"].shape[1]
        sae_eval = stack.enter_context(h5io.open_checked(eval_path, datasets={"error": (n, d)}))
        split = stack.enter_context(h5io.open_checked(
            split_path, datasets={"linear": (n, d), "nonlinear": (n, d)}))
        if not np.array_equal(acts["tokens"][:], tokens):
            raise h5io.InputFileError(f"{acts_path}: tokens differ from the target's; the "
                                      "sources must be activations of the same corpus")
        sources.append(Source(name, acts, sae_eval, split))
    return sources


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def fit_all(sources: list[Source], tgt_eval: h5io.H5File, tgt_split: h5io.H5File, is_test: Tensor,
            chunk: int) -> dict[tuple[str, str], NormalEquations]:
    """Normal equations of the targets on each (source, predictor), over the train rows."""
    n, d_out = len(is_test), 3 * tgt_eval["error"].shape[1]
    normal = {(s.name, p): NormalEquations(s.acts["acts"].shape[1], d_out)
              for s in sources for p in PREDICTORS}
    for rows in chunks(n, chunk):
        train = ~is_test[rows]
        y = targets(tgt_eval, tgt_split, rows)[train]
        for src in sources:
            for name, x in predictors(src, rows).items():
                normal[(src.name, name)].update(x[train], y)
    return normal


def score_all(sources: list[Source], tgt_eval: h5io.H5File, tgt_split: h5io.H5File, is_test: Tensor,
              chunk: int, normal: dict[tuple[str, str], NormalEquations]) -> pd.DataFrame:
    """Held-out R² of each target from each (source, predictor), one row per triple."""
    d = tgt_eval["error"].shape[1]
    fits = {key: eq.solve() for key, eq in normal.items()}
    scores = {key: R2Accumulator(3 * d) for key in fits}
    for rows in chunks(len(is_test), chunk):
        test = is_test[rows]
        y = targets(tgt_eval, tgt_split, rows)[test]
        for src in sources:
            for name, x in predictors(src, rows).items():
                scores[(src.name, name)].update(y.double(), predict(fits[(src.name, name)],
                                                                    x[test]))
    out = []
    for (source, predictor), acc in scores.items():
        result = acc.result()
        for i, target in enumerate(TARGETS):
            part = slice(i * d, (i + 1) * d)
            r2 = r2_result(result.ss_res[part], result.ss_tot[part], result.n)
            out.append({"source": source, "predictor": predictor, "target": target,
                        "r2": r2.mean, "r2_pooled": r2.pooled, "n_test": result.n})
    return pd.DataFrame(out)


def run(args: argparse.Namespace) -> pd.DataFrame:
    with ExitStack() as stack:
        tgt_split = stack.enter_context(h5io.open_checked(
            args.target_split, datasets={"linear": (None, None), "nonlinear": (None, None),
                                         "tokens": (None,)}))
        n, d = tgt_split["linear"].shape
        tgt_eval = stack.enter_context(h5io.open_checked(args.target_eval,
                                                         datasets={"error": (n, d)}))
        sources = open_sources(stack, args.source, n, tgt_split["tokens"][:])
        is_test = split_mask(n, args.test_fraction, args.seed)
        normal = fit_all(sources, tgt_eval, tgt_split, is_test, args.chunk_tokens)
        table = score_all(sources, tgt_eval, tgt_split, is_test, args.chunk_tokens, normal)
    with h5io.atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.cross_site", __doc__)
    p.add_argument("--target-eval", required=True, help="the target SAE's evaluation file")
    p.add_argument("--target-split", required=True, help="the target SAE's split.h5")
    p.add_argument("--source", nargs=4, action="append", required=True,
                   metavar=("NAME", "ACTS", "EVAL", "SPLIT"),
                   help="a source site: label, activations, its SAE's evaluation and split files")
    p.add_argument("--out", required=True, help="tables/figure10b.csv")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    cli.add_threads(p)
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1 or args.chunk_tokens < 1:
        p.error("need 0 < --test-fraction < 1 and --chunk-tokens >= 1")
    names = [s[0] for s in args.source]
    if len(set(names)) != len(names):
        p.error(f"--source names must differ, got {names}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run)


if __name__ == "__main__":
    main()
