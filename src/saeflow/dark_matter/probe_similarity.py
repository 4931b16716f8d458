"""Stage: latent activations vs the norm probe's similarity to each latent (Figure 14).

``python -m saeflow.dark_matter.probe_similarity --sae DIR --acts A.h5 --sae-eval E.h5
--out tables/figure14.csv --metrics P.json --sae-id ID [--test-fraction 0.5] [--seed 0]
[--smooth 100] [--chunk-tokens 4096] [--threads 0]``

As ``latent_activations_vs_probe_sim.py`` of the original: with z = Sae(x) − b_dec (the
reconstruction without the decoder bias), fit the squared norm linearly, ‖z‖² ≈ z·a*. If one
latent i fires alone with value v, z = v·d_i (d_i its unit decoder row) and ‖z‖² = v², so the fit
can only be good if d_i·a* ≈ v for the typical v: the "probe" a* must align with each latent in
proportion to how strongly it fires.

No intercept by default, unlike saeflow's other fits and as the original: ‖z‖² = 0 at z = 0, so
the model passes through the origin, and an intercept b turns the relation into
d_i·a* ≈ v − b/v, which no longer compares with v (``--intercept`` fits one anyway). The figure sorts live latents by their mean activation when
active (``latent_mean_act`` of the evaluation file) and draws d_i·a* next to it, with a running
mean over ``smooth`` neighbouring latents.

Differences from the original: the fit is fitted on the seeded train rows and its R² is scored on held-out rows (the original fitted and reported on
unseeded halves); decoder rows are used as stored (saeflow's TopK keeps them at unit norm; for
other SAEs d_i·a* is scaled by ‖d_i‖, and the table records ‖d_i‖). Dead latents (never active
on the evaluation tokens) have no mean activation and are left out.

Outputs: the table (one row per live latent, in plot order) and ``P.json``: held-out R² of the
norm fit, the bias, and the Pearson and Spearman correlations of d_i·a* with the mean activation.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from saeflow import cli, h5io
from saeflow.dark_matter.encoder_pursuit import decoder
from saeflow.dark_matter.error_split import iter_chunks, open_inputs
from saeflow.dark_matter.norm_prediction import streamed_fit
from saeflow.dark_matter.regression import F64, split_mask
from saeflow.saes import load_sae


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average [n] over ``window`` neighbours, shrinking at both ends."""
    window = max(1, min(window, len(values)))
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(len(values))
    lo = np.clip(idx - (window - 1) // 2, 0, len(values))
    hi = np.clip(idx + window // 2 + 1, 0, len(values))
    return (csum[hi] - csum[lo]) / (hi - lo)


def probe_table(w_dec: Tensor, probe: Tensor, mean_act: np.ndarray, freq: np.ndarray,
                smooth: int) -> pd.DataFrame:
    """One row per live latent sorted by mean activation (descending).

    w_dec [d_sae, d], probe [d] (a*), mean_act / freq [d_sae] from the evaluation file.
    """
    similarity = (w_dec.to(F64) @ probe.to(F64)).numpy()
    live = np.flatnonzero(freq > 0)
    order = live[np.argsort(-mean_act[live], kind="stable")]
    table = pd.DataFrame({
        "rank": np.arange(len(order)), "latent": order, "freq": freq[order],
        "mean_act_when_active": mean_act[order], "probe_similarity": similarity[order],
        "decoder_norm": w_dec.to(F64).norm(dim=1).numpy()[order]})
    table["probe_similarity_smoothed"] = running_mean(table.probe_similarity.to_numpy(), smooth)
    return table


def fit_probe(acts_path: str, eval_path: str, b_dec: Tensor, test_fraction: float, seed: int,
              chunk: int, intercept: bool = False
              ) -> tuple[Tensor, float, float, np.ndarray, np.ndarray]:
    """(a* [d], bias (0 without intercept), held-out R², mean_act [d_sae], freq [d_sae]) of
    ‖z‖² ≈ z·a* (+ b)."""
    acts, sae_eval = open_inputs(acts_path, eval_path)
    with acts, sae_eval:
        n, d = acts["acts"].shape
        if b_dec.shape != (d,):
            raise h5io.InputFileError(f"{acts_path}: d_model {d}, but the SAE's b_dec has shape "
                                      f"{tuple(b_dec.shape)}")
        is_test = split_mask(n, test_fraction, seed)

        def chunks() -> Iterator[tuple[slice, Tensor, Tensor]]:
            for rows, x, sae_error in iter_chunks(acts, sae_eval, chunk):
                z = (x - sae_error - b_dec).to(F64)  # Sae(x) - b_dec
                yield rows, z, z.square().sum(1, keepdim=True)

        fit, r2, _ = streamed_fit(chunks, ~is_test, is_test, d, 1, intercept)
        mean_act, freq = sae_eval["latent_mean_act"][:], sae_eval["latent_freq"][:]
    return fit.weight[:, 0], float(fit.bias[0]), r2.pooled, mean_act, freq


def correlations(table: pd.DataFrame) -> dict:
    sim, act = table.probe_similarity, table.mean_act_when_active
    if len(table) < 2:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(sim.corr(act)), "spearman": float(sim.corr(act, method="spearman"))}


def run(args: argparse.Namespace) -> dict:
    w_dec, b_dec = decoder(load_sae(args.sae))
    probe, bias, r2, mean_act, freq = fit_probe(args.acts, args.sae_eval, b_dec,
                                                args.test_fraction, args.seed, args.chunk_tokens,
                                                args.intercept)
    if len(freq) != w_dec.shape[0]:
        raise h5io.InputFileError(f"{args.sae_eval}: {len(freq)} latents, the SAE has "
                                  f"{w_dec.shape[0]}")
    table = probe_table(w_dec, probe, mean_act, freq, args.smooth)
    corr = correlations(table)
    table = table.assign(sae_id=args.sae_id, norm_r2=r2, bias=bias, **corr)
    with h5io.atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")
    metrics = {"sae_id": args.sae_id, "norm_r2": r2, "bias": bias, "n_live": len(table),
               "n_latents": len(freq), "test_fraction": args.test_fraction, "seed": args.seed,
               "smooth": args.smooth, "intercept": args.intercept, **corr}
    h5io.write_json(args.metrics, metrics)
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.probe_similarity", __doc__)
    p.add_argument("--sae", required=True, help="SAE folder (SAELens layout)")
    p.add_argument("--acts", required=True, help="activations at the SAE's site (.h5)")
    p.add_argument("--sae-eval", required=True, help="the SAE's evaluation file (.h5)")
    p.add_argument("--out", required=True, help="table of Figure 14 (.csv)")
    p.add_argument("--metrics", required=True, help="fit R² and correlations (.json)")
    p.add_argument("--sae-id", required=True)
    p.add_argument("--test-fraction", type=float, default=0.5, help="held-out share of rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--smooth", type=int, default=100, help="latents in the running mean")
    p.add_argument("--intercept", action=argparse.BooleanOptionalAction, default=False,
                   help="fit ‖z‖² ≈ z·a* + b instead of through the origin")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="rows read at once")
    cli.add_threads(p)
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1 or args.smooth < 1 or args.chunk_tokens < 1:
        p.error("--test-fraction must be in (0, 1), --smooth and --chunk-tokens >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_command(parse_args(argv), run)


if __name__ == "__main__":
    main()
