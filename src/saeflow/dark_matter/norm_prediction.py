"""Stage: how well x predicts the squared norm of each part of x, per SAE (Figure 7's violins).

``python -m saeflow.dark_matter.norm_prediction fit --acts A.h5 --sae-eval E.h5 --split S.h5
--out N.json --sae-id ID [--chunk-tokens 4096]``

``python -m saeflow.dark_matter.norm_prediction table --inputs N.json... --out tables/figure7.csv``

``fit`` regresses, from x with a bias column, the squared L2 norm of each of (SaeError = x −
Sae(x); linear and nonlinear parts from :mod:`~saeflow.dark_matter.error_split`)::

    x, Sae(x), SaeError, LinearError, NonlinearError, Sae(x) − NonlinearError

on the error split's held-out rows only (``is_test`` of ``split.h5``), split again with the same
seeded :func:`~saeflow.dark_matter.regression.split_mask` (``test_fraction``, ``seed``) into fit
and score rows. Why not the error split's own train rows: there the nonlinear part is an
in-sample residual, shrunk by about (1 − d/n_train) against the held-out rows, and a norm fitted
on shrunk residuals and scored on full ones gets a strongly negative R² when n_train is not much
larger than d (the original had n = 150k ≫ d = 3584 and did not notice). "x" is the bar the
paper draws for ‖x‖². ``table`` gathers one row per (SAE, target) over the family.

Original (``norm_prediction_violin.py``): it appended the ones column to the *target* matrix
instead of the regressor (so the fit had no intercept and the target's norm included an extra 1),
shuffled without a seed, and fitted on every row the nonlinear part was fitted on. Here the
bias is in the regressors, the split is seeded, and every row used is held out from the fit that
defines the nonlinear part.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.regression import (
    F64,
    LinearFit,
    NormalEquations,
    R2Accumulator,
    R2Result,
    predict,
    split_mask,
)

# the original's order (x, Sae(x), SaeError, LinearError, NonlinearError), then Sae(x) - nonlinear
TARGETS = ("x", "sae", "sae_error", "linear_error", "nonlinear_error", "sae_minus_nonlinear")
LABELS = {"x": "x", "sae": "Sae(x)", "sae_error": "SaeError(x)", "linear_error": "LinearError(x)",
          "nonlinear_error": "NonlinearError(x)", "sae_minus_nonlinear": "Sae(x) − NonlinearError(x)"}

Chunks = Callable[[], Iterator[tuple[slice, Tensor, Tensor]]]  # -> (rows, x [m, p], y [m, t])


def streamed_fit(chunks: Chunks, fit_rows: Tensor, test_rows: Tensor, d_in: int,
                 d_out: int, intercept: bool = True) -> tuple[LinearFit, R2Result, int]:
    """Least squares of y on [x, 1] (on x alone without ``intercept``) over ``fit_rows``, R² per
    target on ``test_rows``.

    Two passes over ``chunks()`` (O(d²) memory); fit_rows, test_rows: [n] bool.
    Returns (fit, held-out R², number of fit rows).
    """
    normal = NormalEquations(d_in, d_out)
    for rows, x, y in chunks():
        keep = fit_rows[rows]
        normal.update(x[keep], y[keep])
    fit = normal.solve(intercept=intercept)
    score = R2Accumulator(d_out)
    for rows, x, y in chunks():
        keep = test_rows[rows]
        score.update(y[keep], predict(fit, x[keep]))
    return fit, score.result(), normal.n


def squared_norms(x: Tensor, error: Tensor, linear: Tensor, nonlinear: Tensor) -> Tensor:
    """[m, 6] float64 squared norms of the parts named in TARGETS (error = Sae(x) − x)."""
    x, error = x.to(F64), error.to(F64)
    linear, nonlinear = linear.to(F64), nonlinear.to(F64)
    sae = x + error
    parts = [x, sae, -error, linear, nonlinear, sae - nonlinear]
    return torch.stack([p.square().sum(1) for p in parts], dim=1)


def held_out_subsplit(is_test: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit rows, score rows) [n] bool: the error split's held-out rows, split again (seeded)."""
    rows = is_test.nonzero().squeeze(1)
    score_sub = split_mask(len(rows), test_fraction, seed)
    fit, score = torch.zeros_like(is_test), torch.zeros_like(is_test)
    fit[rows[~score_sub]], score[rows[score_sub]] = True, True
    return fit, score


def fit_norms(acts_path: str, eval_path: str, split_path: str, test_fraction: float, seed: int,
              chunk: int) -> dict:
    """Held-out R² of each target's squared norm from x, on the error split's held-out rows."""
    acts = h5io.open_checked(acts_path, datasets={"acts": (None, None), "tokens": (None,)})
    n, d = acts["acts"].shape
    with acts, h5io.open_checked(eval_path, datasets={"error": (n, d), "tokens": (n,)}) as ev, \
            h5io.open_checked(split_path, datasets={"linear": (n, d), "nonlinear": (n, d),
                                                    "is_test": (n,), "tokens": (n,)}) as sp:
        for path, h5 in [(eval_path, ev), (split_path, sp)]:
            if not np.array_equal(h5["tokens"][:], acts["tokens"][:]):
                raise h5io.InputFileError(f"{path}: 'tokens' differ from {acts_path}")
        is_test = torch.from_numpy(sp["is_test"][:].astype(bool))

        def chunks() -> Iterator[tuple[slice, Tensor, Tensor]]:
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                x = torch.from_numpy(acts["acts"][rows])
                y = squared_norms(x, *(torch.from_numpy(h5[name][rows]) for h5, name in
                                       [(ev, "error"), (sp, "linear"), (sp, "nonlinear")]))
                yield rows, x, y

        fit_rows, score_rows = held_out_subsplit(is_test, test_fraction, seed)
        _, r2, n_fit = streamed_fit(chunks, fit_rows, score_rows, d, len(TARGETS))
    return {"r2": dict(zip(TARGETS, map(float, r2.per_dim))), "n_fit": n_fit, "n_test": r2.n}


def site_layer(site: str) -> int | None:
    """The layer number of a TransformerLens hook name (``blocks.6.hook_resid_post`` -> 6)."""
    match = re.match(r"blocks\.(\d+)\.", site)
    return int(match.group(1)) if match else None


def read_record(path: str, keys: Sequence[str]) -> dict:
    """A per-SAE JSON file, checked for ``keys``."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise h5io.InputFileError(f"{path}: cannot read JSON ({err})") from err
    missing = [k for k in keys if k not in record]
    if missing:
        raise h5io.InputFileError(f"{path}: keys {missing} missing")
    return record


def gather(paths: Sequence[str], name_column: str, order: Sequence[str]) -> pd.DataFrame:
    """Long table, one row per (SAE, entry of its ``r2`` dict) from per-SAE JSON files, the
    entries in ``order`` (the plot draws them in table order)."""
    rows = []
    for path in paths:
        record = read_record(path, ["sae_id", "site", "width", "k", "mean_l0", "r2"])
        meta = {k: record.get(k) for k in ("sae_id", "site", "width", "k", "mean_l0",
                                           "n_fit", "n_test")}
        meta["layer"] = site_layer(record["site"])
        missing = [name for name in order if name not in record["r2"]]
        if missing:
            raise h5io.InputFileError(f"{path}: no R² for {missing}")
        rows += [{**meta, name_column: name, "r2": record["r2"][name]} for name in order]
    return pd.DataFrame(rows)


def sae_meta(eval_path: str, sae_id: str, site: str, k: int | None) -> dict:
    """Width, k (None for SAEs without one) and mean L0 of an SAE, from its evaluation file."""
    with h5io.open_checked(eval_path, datasets={"l0": (None,)}) as ev:
        return {"sae_id": sae_id, "site": site, "width": int(h5io.plain(ev.attrs["d_sae"])),
                "k": k, "mean_l0": float(np.mean(ev["l0"][:]))}


def _parser() -> argparse.ArgumentParser:
    p = cli.stage_parser("saeflow.dark_matter.norm_prediction", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="one SAE's held-out norm-prediction R²")
    f.add_argument("--acts", required=True, help="activations at the SAE's site (.h5)")
    f.add_argument("--sae-eval", required=True, help="the SAE's evaluation file (.h5)")
    f.add_argument("--split", required=True, help="the SAE's error-split file (.h5)")
    f.add_argument("--out", required=True, help="R² per target (.json)")
    f.add_argument("--sae-id", required=True)
    f.add_argument("--site", required=True, help="hook site of the SAE")
    f.add_argument("--k", type=int, default=None, help="the SAE's k, if it has one")
    f.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of the error split's held-out rows that score the fits")
    f.add_argument("--seed", type=int, default=0, help="seed of that split")
    f.add_argument("--chunk-tokens", type=int, default=4096, help="rows read at once")
    t = sub.add_parser("table", help="Figure 7's table from the per-SAE files")
    t.add_argument("--inputs", nargs="+", required=True, help="per-SAE .json files")
    t.add_argument("--out", required=True, help="tables/figure7.csv")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(1)
    args = _parser().parse_args(argv)
    if args.command == "fit":
        if args.chunk_tokens < 1 or not 0 < args.test_fraction < 1:
            raise SystemExit("--chunk-tokens must be >= 1 and --test-fraction in (0, 1)")
        result = fit_norms(args.acts, args.sae_eval, args.split, args.test_fraction, args.seed,
                           args.chunk_tokens)
        result |= {"test_fraction": args.test_fraction, "seed": args.seed}
        meta = sae_meta(args.sae_eval, args.sae_id, args.site, args.k)
        h5io.write_json(args.out, {**meta, **result})
        return
    table = gather(args.inputs, "target", TARGETS)
    table["label"] = table.target.map(LABELS)
    with h5io.atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")


if __name__ == "__main__":
    main()
