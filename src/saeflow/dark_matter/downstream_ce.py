"""Stage: downstream CE loss with the SAE error's linear or nonlinear part added back (Figure 9).

``python -m saeflow.dark_matter.downstream_ce run --sae DIR --fit F.h5 --model M --tokens T.h5
--site S --out D.json [--sae-id ID] [--seqs 32] [--batch-size 8] [--skip-positions 1]``

``python -m saeflow.dark_matter.downstream_ce table --sae-ids ID... --results D... --eval-metrics
E... --out tables/figure9.csv [--nominal-l0 L...] [--headline-l0 32] [--k-width W]``

``run`` splices, at the SAE's site and at every position >= ``skip``, one of:

=================  ==========================================  =================================
setting            spliced activation                          what it tests
=================  ==========================================  =================================
``sae``            Sae(x)                                      the plain SAE
``sae_linear``     Sae(x) + linear(x) = Sae(x) + x·a + b        the error's linear part restored
``sae_nonlinear``  Sae(x) + nonlinear(x) = x - x·a - b          the error's nonlinear part restored
=================  ==========================================  =================================

with SaeError = x - Sae(x) ≈ x·a + b, the map fitted by :mod:`saeflow.dark_matter.error_split`
(``fit.h5``; the original ``downstream_ce.py`` read ``resid_solution_*.pt`` files that no script
of the original repository writes). For each setting,

    % of CE loss recovered = (L_sae - L_setting) / (L_sae - L_clean) · 100

so 0 is the plain SAE and 100 the clean model. CE is the mean next-token loss of predictions made
at positions >= ``skip`` (the positions the activation cache keeps), on the first ``seqs``
sequences of the evaluation corpus. The map was fitted on the train half of the error split's
seeded token split of the same corpus; the original fitted it on every token it then scored.

``table`` writes ``tables/figure9.csv``, long form, one row per (panel, SAE, setting): panel
``width`` holds the family's SAEs at the k closest to ``headline_l0`` (the original's L0 ≈ 60
sweep over widths), panel ``k`` those at one width (``--k-width``, default the narrowest; the
original swept the 16k SAEs' L0s). ``l0`` is the nominal k; for SAEs without one (JumpReLU,
Gemma Scope) the nominal L0 the config gives (``--nominal-l0``, the release's ``average_l0``, by
which the paper picked its L0≈60 SAEs), else the measured mean L0.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow import cli, h5io
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.metrics import next_token_ce
from saeflow.models import load_model, resolve_site, spliced_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from saeflow.saes import load_sae

SETTINGS = ("sae_linear", "sae_nonlinear")
Replace = Callable[[Tensor], Tensor]


def load_error_map(path: str, d: int) -> tuple[Tensor, Tensor]:
    """(a [d, d], b [d]) float64 of SaeError ≈ x·a + b from an error-split ``fit.h5``."""
    with h5io.open_checked(path, datasets={"weight": (d, d), "bias": (d,)}) as h5:
        return torch.from_numpy(h5["weight"][:]), torch.from_numpy(h5["bias"][:])


def linear_error(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [..., d] -> x·a + b [..., d], in x's dtype (the map is kept in float64 on disk)."""
    return x @ weight.to(x) + bias.to(x)


def replacements(sae: Callable[[Tensor], Tensor], weight: Tensor, bias: Tensor
                 ) -> dict[str, Replace]:
    """The spliced activation of each setting, as a function of the site's activation x."""
    def sae_linear(x: Tensor) -> Tensor:
        return sae(x) + linear_error(x, weight, bias)

    def sae_nonlinear(x: Tensor) -> Tensor:
        # Sae(x) + (x - Sae(x) - x·a - b): the SAE term cancels exactly
        return x - linear_error(x, weight, bias)

    return {"sae": sae, "sae_linear": sae_linear, "sae_nonlinear": sae_nonlinear}


def percent_recovered(ce_sae: float, ce_setting: float, ce_clean: float) -> float:
    """(L_sae - L_setting) / (L_sae - L_clean) · 100: 0 for the plain SAE, 100 for the model."""
    return (ce_sae - ce_setting) / (ce_sae - ce_clean) * 100.0


def spliced_ce(model: PreTrainedModel, site: str, tokens: np.ndarray, skip: int, batch_size: int,
               settings: Mapping[str, Replace]) -> dict[str, float]:
    """Mean next-token CE at positions >= skip: clean, and with each setting spliced in.

    tokens [n_seq, ctx] int. Returns {"clean": ..., name: ... for each setting, "n_predictions"}.
    """
    module = resolve_site(model, site)[0]
    sums = dict.fromkeys(["clean", *settings], 0.0)
    n = 0
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            ids = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))
            ids = ids.to(model.device)
            sums["clean"] += float(next_token_ce(model(ids).logits, ids)[:, skip:].sum())
            for name, replace in settings.items():
                logits = spliced_logits(model, module, ids, skip, replace)
                sums[name] += float(next_token_ce(logits, ids)[:, skip:].sum())
            n += ids.shape[0] * (ids.shape[1] - 1 - skip)
    return {**{name: total / n for name, total in sums.items()}, "n_predictions": n}


def ce_result(ce: Mapping[str, float]) -> dict[str, float]:
    """The per-SAE record: each CE and each setting's % of CE loss recovered."""
    result = {f"ce_{name}": value for name, value in ce.items() if name != "n_predictions"}
    for name in SETTINGS:
        result[f"pct_recovered_{name}"] = percent_recovered(ce["sae"], ce[name], ce["clean"])
    result["n_predictions"] = int(ce["n_predictions"])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the SAE, its fitted error map and the model; write the per-SAE JSON."""
    device = resolve_device(args.device)
    sae = load_sae(args.sae).to(device)
    weight, bias = load_error_map(args.fit, sae.cfg.d_in)
    with h5io.open_checked(args.tokens, datasets={"tokens": (None, None)}) as h5:
        tokens = h5["tokens"][: args.seqs]
    if tokens.shape[1] <= args.skip_positions + 1:
        raise ValueError(f"{args.tokens}: context {tokens.shape[1]} leaves no prediction after "
                         f"skipping {args.skip_positions} positions")
    model, _ = load_model(args.model, device=device)
    ce = spliced_ce(model, args.site, tokens, args.skip_positions, args.batch_size,
                    replacements(sae, weight, bias))
    cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
    result = {"sae_id": args.sae_id, "site": args.site, "width": int(sae.cfg.d_sae),
              "k": cfg.get("k"), "seqs": len(tokens), "skip_positions": args.skip_positions,
              "fit_file": args.fit, **ce_result(ce)}
    h5io.write_json(args.out, result)
    return result


def _load(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise h5io.InputFileError(f"{path}: cannot read JSON ({err})") from err


def collect(sae_ids: Sequence[str], results: Sequence[str], evals: Sequence[str],
            nominal_l0s: Sequence[float] | None = None) -> pd.DataFrame:
    """One row per SAE: width, k / L0 and the CEs (inputs are parallel lists)."""
    nominal = [None] * len(sae_ids) if nominal_l0s is None else list(nominal_l0s)
    if not len(sae_ids) == len(results) == len(evals) == len(nominal):
        raise ValueError("--sae-ids, --results, --eval-metrics and --nominal-l0 must have the "
                         "same length")
    rows = []
    for sae_id, path, eval_path, nominal_l0 in zip(sae_ids, results, evals, nominal):
        record, ev = _load(path), _load(eval_path)
        for key in ("sae_id", "width", "ce_sae", "ce_clean",
                    *(f"pct_recovered_{s}" for s in SETTINGS)):
            if key not in record:
                raise h5io.InputFileError(f"{path}: missing key {key!r}")
        if record["sae_id"] != sae_id or ev.get("sae_id", sae_id) != sae_id:
            raise h5io.InputFileError(f"{path} / {eval_path}: not made for SAE {sae_id!r}")
        k = record.get("k")
        if nominal_l0 is not None and np.isnan(nominal_l0):
            nominal_l0 = None  # the rule writes nan for an SAE the config gives no L0
        if k is not None and nominal_l0 is not None and float(nominal_l0) != float(k):
            raise h5io.InputFileError(f"{path}: k {k} differs from the nominal L0 {nominal_l0} "
                                      f"given for SAE {sae_id!r}")
        l0 = k if k is not None else ev["mean_l0"] if nominal_l0 is None else nominal_l0
        rows.append({**record, "k": k, "l0": l0, "mean_l0": ev["mean_l0"]})
    return pd.DataFrame(rows)


def headline_saes(saes: pd.DataFrame, headline_l0: float) -> pd.DataFrame:
    """Per width, the SAE whose L0 is closest to ``headline_l0`` (the smaller one on a tie).

    On a width x k grid this is one k for every width; on Gemma Scope, whose L0s differ per
    width, it is the original's "L0 closest to 60" pick (58, 57, 55, 62, 64, 48, 57).
    """
    distance = (saes.l0 - headline_l0).abs()
    order = saes.assign(_d=distance).sort_values(["width", "_d", "l0"])
    return order.groupby("width", sort=True).head(1).drop(columns="_d")


def figure9_table(saes: pd.DataFrame, headline_l0: float, k_width: int | None) -> pd.DataFrame:
    """Long table: panel (width | k), sae_id, width, l0, setting, ce, pct_recovered."""
    width = int(saes.width.min()) if k_width is None else k_width
    if width not in set(saes.width):
        raise ValueError(f"--k-width {width}: no SAE of that width (widths: "
                         f"{sorted(set(saes.width))})")
    panels = [("width", headline_saes(saes, headline_l0)), ("k", saes[saes.width == width])]
    rows = []
    for panel, group in panels:
        for _, sae in group.iterrows():
            for setting in SETTINGS:
                rows.append({"panel": panel, "sae_id": sae.sae_id, "width": int(sae.width),
                             "l0": sae.l0, "mean_l0": sae.mean_l0, "setting": setting,
                             "ce": sae[f"ce_{setting}"], "ce_sae": sae.ce_sae,
                             "ce_clean": sae.ce_clean,
                             "pct_recovered": sae[f"pct_recovered_{setting}"]})
    return pd.DataFrame(rows).sort_values(["panel", "setting", "width", "l0"]).reset_index(
        drop=True)


def table(args: argparse.Namespace) -> pd.DataFrame:
    saes = collect(args.sae_ids, args.results, args.eval_metrics, args.nominal_l0)
    out = figure9_table(saes, args.headline_l0, args.k_width)
    with h5io.atomic_path(args.out) as tmp:
        out.to_csv(tmp, index=False)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.stage_parser("saeflow.dark_matter.downstream_ce", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="CE of each setting for one SAE")
    r.add_argument("--sae", required=True, help="SAE folder in the SAELens layout")
    r.add_argument("--fit", required=True, help="the error split's fit.h5 for this SAE")
    r.add_argument("--model", required=True, help="model folder or hub id")
    r.add_argument("--tokens", required=True, help="evaluation corpus tokens (.h5)")
    r.add_argument("--site", required=True, help="hook site the SAE reads and is spliced into")
    r.add_argument("--out", required=True, help="per-SAE result (.json)")
    r.add_argument("--sae-id", default="", help="recorded in the output")
    r.add_argument("--seqs", type=int, default=32, help="leading sequences of the corpus to use")
    r.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    r.add_argument("--skip-positions", type=int, default=1, help="leading positions not spliced")
    cli.add_threads(r)
    r.add_argument("--device", default="cpu", help=DEVICE_HELP)
    t = sub.add_parser("table", help="tables/figure9.csv from the per-SAE results")
    t.add_argument("--sae-ids", nargs="+", required=True)
    t.add_argument("--results", nargs="+", required=True, help="per-SAE downstream_ce.json")
    t.add_argument("--eval-metrics", nargs="+", required=True, help="per-SAE metrics.json")
    t.add_argument("--out", required=True, help="tables/figure9.csv")
    t.add_argument("--nominal-l0", nargs="+", type=float, default=None,
                   help="per SAE, in the same order: its k, or the nominal L0 of an SAE "
                   "without one (default: the measured mean L0)")
    t.add_argument("--headline-l0", type=float, default=32.0,
                   help="width panel: per width, the SAE whose L0 is closest to this")
    t.add_argument("--k-width", type=int, default=None,
                   help="k panel: the SAEs of this width (default: the narrowest)")
    args = p.parse_args(argv)
    if args.command == "run" and (args.seqs < 1 or args.batch_size < 1 or args.skip_positions < 0):
        p.error("--seqs and --batch-size must be >= 1, --skip-positions >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_command(parse_args(argv), {"run": run, "table": table})


if __name__ == "__main__":
    main()
