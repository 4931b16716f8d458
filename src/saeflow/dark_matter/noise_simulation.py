"""Stage: synthetic noise simulation of SAE dark matter (Figure 15 and Table 1).

``python -m saeflow.dark_matter.noise_simulation run --sae DIR --acts A.h5 --sae-eval E.h5
--out R.csv [--tokens 8192] [--ablate-percents 0 10 ...] [--act-noise 1] [--rec-noise 0.6]
[--grid 0 1 2 3 4] [--noise-unit 0.1] [--test-fraction 0.5] [--seed 0]``

``python -m saeflow.dark_matter.noise_simulation tables --runs R.csv --figure15 F.csv
--table1 T.csv``

Can the paper's error components come from simple mechanisms? The original
(``synthetic_simulation.py``) builds a world where they are known. On a seeded subset of
evaluation tokens:

    x_true = Sae(acts)                          a "model" that is exactly sparse in the SAE basis
    recon  = Sae_p(acts)                        the same with the least frequently firing p% of
                                                latents zeroed (absent features)
    x      = x_true + σ_act · u · ε_act         activation noise the dictionary cannot see
    x̂      = recon  + σ_rec · u · ε_rec         reconstruction noise of the "SAE"

with ε ~ N(0, I) drawn once (the same draws at every σ, so curves differ only by the
mechanism) and u = ``noise_unit`` × the pooled per-coordinate standard deviation of x_true. Then
SaeError = x - x̂ is regressed on x (bias column, float64, seeded train/test split as
:mod:`~saeflow.dark_matter.error_split`) and, on the held-out rows,

    fvu_recon        = Σ‖x - x̂‖² / Σ‖x - x̄‖²               the SAE's FVU
    fvu_recon_linear = Σ‖x - x̂ - linear(x)‖² / Σ‖x - x̄‖²    the nonlinear error
    linear_error     = fvu_recon - fvu_recon_linear         what the linear prediction removes

Figure 15 draws both FVUs against p for no noise, activation noise only, reconstruction noise
only and both (σ_act = ``act_noise``, σ_rec = ``rec_noise``). Table 1 runs every (σ_act, σ_rec)
pair of ``grid`` at every p and reports the Pearson correlation of each noise level with each
error part across the grid, averaged over p (the ablation level shifts both parts, which would
otherwise swamp the noise effect). Activation noise is partly predictable from x (it is in x),
reconstruction noise is not (it is independent of x): the first should feed the linear error,
the second the nonlinear error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.regression import F64, NormalEquations, predict, split_mask
from saeflow.saes import load_sae

Decode = Callable[[Tensor], Tensor]


class SimResult(NamedTuple):
    """Held-out FVUs of one simulated condition."""

    fvu_recon: float  # FVU of x̂
    fvu_recon_linear: float  # FVU of x̂ + linear(x): the nonlinear error


def ablation_order(freq: np.ndarray) -> Tensor:
    """Latent ids [d_sae], least frequently firing first (ties: lower id first)."""
    return torch.from_numpy(np.argsort(freq, kind="stable"))


def ablated(latents: Tensor, order: Tensor, percent: float) -> Tensor:
    """latents [n, d_sae] with the first floor(percent% · d_sae) latents of ``order`` zeroed."""
    count = int(np.floor(latents.shape[1] * percent / 100.0))
    out = latents.clone()
    out[:, order[:count]] = 0
    return out


def noise_scale(x_true: Tensor, unit: float) -> float:
    """``unit`` × the pooled per-coordinate standard deviation of x_true [n, d]."""
    centred = x_true.to(F64) - x_true.to(F64).mean(0)
    return unit * float(centred.square().mean().sqrt())


def simulate(x_true: Tensor, recon: Tensor, eps_act: Tensor, eps_rec: Tensor, sigma_act: float,
             sigma_rec: float, is_test: Tensor) -> SimResult:
    """One condition: noisy x and x̂ [n, d], SaeError regressed on x, held-out FVUs.

    eps_* are scaled noise draws [n, d] (already × the noise unit); is_test [n] bool.
    """
    x = (x_true + sigma_act * eps_act).to(F64)
    x_hat = (recon + sigma_rec * eps_rec).to(F64)
    err = x - x_hat  # SaeError = x - Sae(x)
    train = ~is_test
    normal = NormalEquations(x.shape[1], x.shape[1])
    normal.update(x[train], err[train])
    pred = predict(normal.solve(), x[is_test])
    x_test, err_test = x[is_test], err[is_test]
    total = float((x_test - x_test.mean(0)).square().sum())
    return SimResult(float(err_test.square().sum()) / total,
                     float((err_test - pred).square().sum()) / total)


def conditions(act_noise: float, rec_noise: float, grid: Sequence[float]) -> pd.DataFrame:
    """(kind, act_noise, rec_noise): Figure 15's four lines, then Table 1's grid."""
    figure = [(0.0, 0.0), (act_noise, 0.0), (0.0, rec_noise), (act_noise, rec_noise)]
    rows = [("figure15", a, r) for a, r in dict.fromkeys(figure)]
    rows += [("table1", float(a), float(r)) for a in grid for r in grid]
    return pd.DataFrame(rows, columns=pd.Index(["kind", "act_noise", "rec_noise"]))


def run_grid(x_true: Tensor, decode: Decode, latents: Tensor, order: Tensor,
             percents: Sequence[float], todo: pd.DataFrame, eps_act: Tensor, eps_rec: Tensor,
             is_test: Tensor) -> pd.DataFrame:
    """Every condition of ``todo`` at every ablation percent, one row each."""
    rows = []
    for percent in percents:
        with torch.inference_mode():
            recon = decode(ablated(latents, order, percent))
        for cond in todo.to_dict("records"):
            result = simulate(x_true, recon, eps_act, eps_rec, cond["act_noise"],
                              cond["rec_noise"], is_test)
            rows.append({**cond, "ablate_percent": float(percent),
                         **result._asdict(),
                         "linear_error": result.fvu_recon - result.fvu_recon_linear,
                         "nonlinear_error": result.fvu_recon_linear})
    return pd.DataFrame(rows)


def correlation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 1: Pearson r of each noise level with each error part over the grid, mean over p."""
    grid = runs[runs.kind == "table1"]
    rows = []
    for noise, label in [("act_noise", "activation noise"), ("rec_noise", "reconstruction noise")]:
        row: dict[str, str | float] = {"noise": label}
        for part in ("linear_error", "nonlinear_error"):
            per_p = [np.corrcoef(g[noise], g[part])[0, 1] for _, g in grid.groupby("ablate_percent")]
            row[part] = float(np.mean(per_p))
            row[f"{part}_min"], row[f"{part}_max"] = float(np.min(per_p)), float(np.max(per_p))
        rows.append(row)
    return pd.DataFrame(rows)


def load_inputs(args: argparse.Namespace, sae) -> tuple[Tensor, np.ndarray]:
    """A seeded, sorted subset of activation rows [m, d] and the per-latent firing frequency."""
    d = sae.cfg.d_in
    with h5io.open_checked(args.acts, datasets={"acts": (None, d)}) as acts, \
            h5io.open_checked(args.sae_eval, datasets={"latent_freq": (sae.cfg.d_sae,)}) as ev:
        n = acts["acts"].shape[0]
        rng = np.random.default_rng(args.seed)
        rows = np.sort(rng.choice(n, size=min(args.tokens, n), replace=False))
        return torch.from_numpy(acts["acts"][rows]), ev["latent_freq"][:]


def run(args: argparse.Namespace) -> pd.DataFrame:
    sae = load_sae(args.sae)
    x_acts, freq = load_inputs(args, sae)
    with torch.inference_mode():
        latents = sae.encode(x_acts)
        x_true = sae.decode(latents)
    generator = torch.Generator().manual_seed(args.seed)
    unit = noise_scale(x_true, args.noise_unit)
    eps_act = torch.randn(x_true.shape, generator=generator) * unit
    eps_rec = torch.randn(x_true.shape, generator=generator) * unit
    is_test = split_mask(len(x_true), args.test_fraction, args.seed)
    todo = conditions(args.act_noise, args.rec_noise, args.grid)
    runs = run_grid(x_true, sae.decode, latents, ablation_order(freq), args.ablate_percents, todo,
                    eps_act, eps_rec, is_test)
    runs["noise_unit_abs"] = unit
    runs["n_tokens"] = len(x_true)
    with h5io.atomic_path(args.out) as tmp:
        runs.to_csv(tmp, index=False)
    return runs


def tables(args: argparse.Namespace) -> None:
    runs = pd.read_csv(args.runs)
    missing = {"kind", "act_noise", "rec_noise", "ablate_percent", "fvu_recon",
               "fvu_recon_linear", "linear_error", "nonlinear_error"} - set(runs.columns)
    if missing:
        raise h5io.InputFileError(f"{args.runs}: columns {sorted(missing)} missing")
    with h5io.atomic_path(args.figure15) as tmp:
        runs[runs.kind == "figure15"].to_csv(tmp, index=False)
    with h5io.atomic_path(args.table1) as tmp:
        correlation_table(runs).to_csv(tmp, index=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.noise_simulation", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="simulate every condition for one SAE")
    r.add_argument("--sae", required=True, help="SAE folder in the SAELens layout")
    r.add_argument("--acts", required=True, help="evaluation activations at the SAE's site")
    r.add_argument("--sae-eval", required=True, help="the SAE's evaluation file (latent_freq)")
    r.add_argument("--out", required=True, help="one row per run (.csv)")
    r.add_argument("--tokens", type=int, default=8192, help="evaluation rows used (seeded)")
    r.add_argument("--ablate-percents", type=float, nargs="+", default=[0, 10, 20, 30, 40, 50])
    r.add_argument("--act-noise", type=float, default=1.0, help="Figure 15's activation sigma")
    r.add_argument("--rec-noise", type=float, default=0.6, help="Figure 15's reconstruction sigma")
    r.add_argument("--grid", type=float, nargs="+", default=[0, 1, 2, 3, 4],
                   help="Table 1's sigmas (every pair is run)")
    r.add_argument("--noise-unit", type=float, default=0.1,
                   help="noise std at sigma 1, as a fraction of x_true's per-coordinate std")
    r.add_argument("--test-fraction", type=float, default=0.5)
    r.add_argument("--seed", type=int, default=0)
    cli.add_threads(r)
    t = sub.add_parser("tables", help="tables/figure15.csv and tables/table1.csv from the runs")
    t.add_argument("--runs", required=True)
    t.add_argument("--figure15", required=True)
    t.add_argument("--table1", required=True)
    args = p.parse_args(argv)
    if args.command == "run":
        if not 0 < args.test_fraction < 1 or args.tokens < 2 or args.noise_unit <= 0:
            p.error("need 0 < --test-fraction < 1, --tokens >= 2 and --noise-unit > 0")
        if any(not 0 <= v <= 100 for v in args.ablate_percents) or min(args.grid) < 0:
            p.error("--ablate-percents must be in [0, 100] and --grid values >= 0")
        if len(set(args.grid)) < 2:
            p.error("--grid needs at least 2 distinct levels for a correlation")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_command(parse_args(argv), {"run": run, "tables": tables})


if __name__ == "__main__":
    main()
