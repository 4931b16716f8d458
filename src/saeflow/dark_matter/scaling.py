"""Stage: width × k scaling of an SAE family's error, as the tables behind Figures 1–5.

``python -m saeflow.dark_matter.scaling collect --sae-ids ID... --sae-cfg C... --eval-metrics E...
--split-metrics S... --pursuit P... --saes-out tables/dark_matter_saes.csv
--fits-out tables/dark_matter_power_laws.csv [--nominal-l0 L...] [--l0-targets T...]
[--n-boot 200] [--seed 0]``

``python -m saeflow.dark_matter.scaling figure --figure N --saes tables/dark_matter_saes.csv
--fits tables/dark_matter_power_laws.csv --out tables/figureN.csv [--headline-l0 32]
[--extrapolate 4] [--points 60]``

``collect`` joins, per SAE of the family, its evaluation metrics (``sae_eval``), its error-split
metrics (``error_split``) and its pursuit metrics (``encoder_pursuit``), reading the width and k
from the SAE's own ``cfg.json``; then fits FVU(W) = c + a·W^(-m) per sparsity group (below) with
:func:`~saeflow.dark_matter.power_law.fit_power_law` (residual-bootstrap uncertainty) to the FVU,
the nonlinear FVU and the pursuit FVU. ``figure`` writes one figure's table from those two.

Sparsity groups. Each SAE has a sparsity key ``l0``: its k for a TopK family (a width × k grid),
else the nominal L0 the config's SAE table gives it (``--nominal-l0``; a Gemma Scope SAE is
JumpReLU, has no k, and its release names it by an L0 that differs from width to width). A TopK
family has one group per k. A family without a shared k has one group per target L0
(``--l0-targets``: ``dark_matter.headline_l0`` and ``dark_matter.l0_targets``), made of the SAE
whose nominal L0 is closest to the target at each width (the smaller L0 on a tie), as the
paper's L0≈60 selection (58, 57, 55, 62, 64, 48, 57 at 16k ... 1m); one SAE may belong to two
groups. In the fits and the Figure 1, 2 and 5 tables, ``k`` is the group's key (the k, or the
target L0) and ``grouping`` says which ("k" or "closest_l0"); in the Figure 3 and 4 grids ``k``
is the SAE's ``l0``. For a TopK family every table is what it was before groups existed, plus
the ``l0`` and ``grouping`` columns.

Figure mapping. The Dark Matter README builds "Figures 1–6, 10a, 11, 12" from two scripts without
saying which file is which figure, and the numbering differs between arXiv v1, v2 and TMLR.
saeflow's ``plots/figureN.pdf`` are:

========  ======================================================  ==============================
saeflow   what it shows                                           original file (sae_power_laws)
========  ======================================================  ==============================
Figure 1  headline decomposition of FVU vs width at the family's  scaling_filled_with_zoom_
          k closest to ``headline_l0``: absent features, linear   combined.pdf
          error, encoder error, nonlinear error (stacked)
Figure 2  FVU and nonlinear FVU vs width, power-law fit per k     sae_power_law_fit_60.pdf (one
                                                                  L0 there, every k here)
Figure 3  R² of predicting the error vector and its squared norm  sae_power_law_contours_{vec,
          from x, over width × k                                  norm}.pdf
Figure 4  nonlinear FVU over width × k                            sae_power_law_contour.pdf
Figure 5  the decomposition with pursuit, measured per SAE (no    scaling_filled_pursuit.pdf
          fit, every k): held-out FVU split into linear error,    (--to_plot pursuit)
          encoder error and nonlinear error at each width
========  ======================================================  ==============================

The other figures come from their own stages: Figures 6, 10a, 11 and 12 from
:mod:`~saeflow.dark_matter.per_token` (``sae_power_laws_per_token.py``: per-token predictability
across widths, its gain from the nonlinear norm, and error norms over a token window), Figure 7
from :mod:`~saeflow.dark_matter.norm_prediction` (``norm_prediction_violin.py``), Figure 13 from
:mod:`~saeflow.dark_matter.norm_baselines` (``compare_norm_prediction_to_baselines.py``) and
Figure 14 from :mod:`~saeflow.dark_matter.probe_similarity`
(``latent_activations_vs_probe_sim.py``).

Figure 5 bars, per SAE, all on the error split's held-out rows, stack to the SAE's FVU there::

    linear error    = FVU - N             (N = nonlinear FVU: Sae(x) + linear prediction)
    encoder error   = N - P               (P = pursuit nonlinear FVU, as in Figure 1)
    nonlinear error = P

Figure 1 extrapolates with the power law and a mean N̄; Figure 5 shows what was measured.

Figure 1 bands, as the original draws them (``fill_between`` of the power-law curve, c, the mean
nonlinear FVU N̄ and the pursuit nonlinear FVU P(W)), at each width W of the headline group::

    absent features = PL(W) - c        (PL(W) = c + a·W^(-m), the fitted FVU)
    linear error    = c - N̄            (N̄ = mean over widths of the nonlinear FVU)
    encoder error   = N̄ - P(W)
    nonlinear error = P(W)

so the four bands add up to PL(W) at every width. P(W) is interpolated linearly in log W between
measured widths and held at the last measured value beyond them (as the original). When pursuit
runs on a subset of the evaluation rows (``pursuit_tokens``), its regression has fewer fit rows
than the error split's, which alone raises held-out FVU; so P(W) is the SAE's nonlinear FVU minus
the improvement pursuit brings on the subset, both nonlinear FVUs of that difference taken on the
same rows with the same fit rows (``fvu_nonlinear_pursuit``; the raw subset value is
``fvu_nonlinear_pursuit_rows``; they are equal when pursuit covers every row). A band that
comes out negative (c < N̄ or P(W) > N̄: too few widths or tokens for the fit to separate them)
is kept signed and flagged in the ``note`` column rather than clipped.

Nonlinear FVUs are scored on held-out rows (the original scored them on all rows, its fitting rows
included). The fraction of the error that is linearly predictable is
``linear_predictable_fraction`` = 1 - FVU_nonlinear / FVU on those rows: the share of Σ‖SaeError‖²
that adding the linear prediction removes. (``linear_norm_fraction`` = Σ‖linear‖² / Σ‖SaeError‖²
equals it for an exact fit but exceeds it, even past 1, when the regression overfits.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saeflow import cli, h5io
from saeflow.dark_matter.power_law import fit_power_law, power_law

FIT_QUANTITIES = ("fvu", "fvu_nonlinear", "fvu_pursuit")
FIGURES = (1, 2, 3, 4, 5)
MIN_WIDTHS = 3  # a + c + m: three parameters


class ScalingInputError(ValueError):
    """Per-SAE inputs that do not belong together; the message names the file."""


# ---------------------------------------------------------------- collect


def _load_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ScalingInputError(f"{path}: cannot read JSON ({err})") from err


def _need(record: dict[str, Any], keys: Sequence[str], path: str | Path) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ScalingInputError(f"{path}: missing keys {missing}")


def sparsity_key(cfg: dict[str, Any], nominal_l0: float | None, cfg_path: str | Path
                 ) -> tuple[float, float]:
    """(k or NaN, l0): the k of a TopK SAE, else the nominal L0 the config gives it.

    The rule passes a nominal L0 for every SAE (k for TopK entries); one that contradicts the
    cfg.json's k means the lists are out of step, so it is an error, not a silent choice.
    """
    k = cfg.get("k")
    if nominal_l0 is not None and np.isnan(nominal_l0):
        nominal_l0 = None  # the rule writes nan for an SAE the config gives no L0
    if k is None:
        if nominal_l0 is None:
            raise ScalingInputError(f"{cfg_path}: no 'k' (not a TopK SAE) and no nominal L0 "
                                    "given for it (--nominal-l0)")
        return np.nan, float(nominal_l0)
    if nominal_l0 is not None and float(nominal_l0) != float(k):
        raise ScalingInputError(f"{cfg_path}: k {k} differs from the nominal L0 {nominal_l0} "
                                "given for this SAE")
    return int(k), int(k)


def sae_row(sae_id: str, cfg_path: str, eval_path: str, split_path: str,
            pursuit_path: str, nominal_l0: float | None = None) -> dict[str, Any]:
    """One SAE's row of the scaling table, from its four input files (checked to match)."""
    cfg, ev, split, pursuit = (_load_json(p) for p in (cfg_path, eval_path, split_path,
                                                        pursuit_path))
    _need(cfg, ["d_sae"], cfg_path)
    k, l0 = sparsity_key(cfg, nominal_l0, cfg_path)
    _need(ev, ["fvu", "mean_l0", "n_tokens"], eval_path)
    _need(split, ["fvu_nonlinear", "fvu_sae", "r2_mean", "r2_pooled", "norm_r2",
                  "linear_norm_fraction", "nonlinear_norm_fraction", "n_test", "seed",
                  "test_fraction"], split_path)
    _need(pursuit, ["fvu_pursuit", "fvu_nonlinear_pursuit", "fvu_nonlinear_sae", "fvu_sae",
                    "seed", "test_fraction", "n_rows", "pursuit_worse_fraction"], pursuit_path)
    for path, record in [(eval_path, ev), (split_path, split), (pursuit_path, pursuit)]:
        if record.get("sae_id", sae_id) != sae_id:
            raise ScalingInputError(f"{path}: made for SAE {record['sae_id']!r}, not {sae_id!r}")
    for key in ("seed", "test_fraction"):
        if split[key] != pursuit[key]:
            raise ScalingInputError(f"{pursuit_path}: {key} {pursuit[key]!r} differs from the "
                                    f"error split's {split[key]!r} ({split_path})")
    return {
        "sae_id": sae_id, "width": int(cfg["d_sae"]), "k": k, "l0": l0,
        "mean_l0": ev["mean_l0"], "fvu": ev["fvu"], "n_tokens": ev["n_tokens"],
        "ce_loss_score": ev.get("ce_loss_score", np.nan),
        "fvu_test": split["fvu_sae"], "fvu_nonlinear": split["fvu_nonlinear"],
        "linear_predictable_fraction": 1 - split["fvu_nonlinear"] / split["fvu_sae"],
        "r2_error_vector": split["r2_mean"], "r2_error_vector_pooled": split["r2_pooled"],
        "r2_error_norm": split["norm_r2"],
        "linear_norm_fraction": split["linear_norm_fraction"],
        "nonlinear_norm_fraction": split["nonlinear_norm_fraction"],
        "n_test": split["n_test"], "seed": split["seed"], "test_fraction": split["test_fraction"],
        "fvu_pursuit": pursuit["fvu_pursuit"],
        "fvu_sae_pursuit_rows": pursuit["fvu_sae"],
        "fvu_nonlinear_sae_pursuit_rows": pursuit["fvu_nonlinear_sae"],
        "fvu_nonlinear_pursuit_rows": pursuit["fvu_nonlinear_pursuit"],
        # what pursuit removes, measured on identical rows with identical fit sets, taken off
        # the SAE's nonlinear FVU on the full split (equal to the pursuit rows' value when
        # pursuit ran on every evaluation row)
        "fvu_nonlinear_pursuit": split["fvu_nonlinear"] - (pursuit["fvu_nonlinear_sae"]
                                                           - pursuit["fvu_nonlinear_pursuit"]),
        "pursuit_rows": pursuit["n_rows"],
        "pursuit_worse_fraction": pursuit["pursuit_worse_fraction"],
    }


def collect(sae_ids: Sequence[str], cfgs: Sequence[str], evals: Sequence[str],
            splits: Sequence[str], pursuits: Sequence[str],
            nominal_l0s: Sequence[float] | None = None) -> pd.DataFrame:
    """The per-SAE scaling table, sorted by (l0, width); inputs are parallel lists."""
    nominal = [None] * len(sae_ids) if nominal_l0s is None else list(nominal_l0s)
    lengths = {len(x) for x in (sae_ids, cfgs, evals, splits, pursuits, nominal)}
    if len(lengths) != 1:
        raise ScalingInputError(f"per-SAE input lists differ in length: {sorted(lengths)}")
    rows = [sae_row(*args) for args in zip(sae_ids, cfgs, evals, splits, pursuits, nominal)]
    table = pd.DataFrame(rows).sort_values(["l0", "width"]).reset_index(drop=True)
    dup = table[table.duplicated(["l0", "width"], keep=False)]
    if len(dup):
        raise ScalingInputError(f"two SAEs share a (width, k or L0): {sorted(dup.sae_id)}")
    return table


def has_shared_k(saes: pd.DataFrame) -> bool:
    """True for a TopK family (every SAE has a k), grouped by k; False: grouped by target L0."""
    return "k" in saes and bool(saes.k.notna().all())


def _with_l0(saes: pd.DataFrame) -> pd.DataFrame:
    """Tables written before the ``l0`` column existed are TopK: their l0 is their k."""
    return saes if "l0" in saes else saes.assign(l0=saes.k)


def closest_l0(saes: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per width, the SAE whose ``l0`` is closest to ``target`` (the smaller L0 on a tie)."""
    order = saes.assign(_d=(saes.l0 - target).abs()).sort_values(["width", "_d", "l0"])
    return order.groupby("width", sort=True).head(1).drop(columns="_d")


def sparsity_groups(saes: pd.DataFrame, l0_targets: Sequence[float]
                    ) -> list[tuple[Any, str, pd.DataFrame]]:
    """(key, grouping, SAEs sorted by width): one per k, or one per target L0 without a k.

    The key is the k as the table stores it (a numpy integer for a TopK family, so that tables
    keep writing it as an integer) or the target L0 as a float.

    A TopK family's grid is swept along each k; a family without a shared k (Gemma Scope) has
    no such rows, so each target L0 takes the SAE closest to it at each width, as the paper's
    L0≈60 selection. Targets are ignored for a TopK family.
    """
    saes = _with_l0(saes)
    if has_shared_k(saes):
        return [(k, "k", group.sort_values("width")) for k, group in saes.groupby("k", sort=True)]
    if not len(l0_targets):
        raise ScalingInputError("the family's SAEs have no shared k, so its groups need target "
                                "L0s (--l0-targets, from dark_matter.headline_l0 / l0_targets)")
    return [(t, "closest_l0", closest_l0(saes, t).assign(k=t))
            for t in sorted({float(t) for t in l0_targets})]


def fit_table(saes: pd.DataFrame, n_boot: int, seed: int,
              l0_targets: Sequence[float] = ()) -> pd.DataFrame:
    """Power-law fits per (group, quantity); NaN parameters where a group has < 3 widths."""
    rows = []
    for k, grouping, group in sparsity_groups(saes, l0_targets):
        for quantity in FIT_QUANTITIES:
            row: dict[str, Any] = {"k": k, "grouping": grouping, "quantity": quantity,
                                   "n_widths": len(group), "n_boot": n_boot, "seed": seed,
                                   "note": ""}
            if len(group) < MIN_WIDTHS:
                row["note"] = f"not fitted: {len(group)} widths, need >= {MIN_WIDTHS}"
                rows.append(row)
                continue
            fit = fit_power_law(group.width.to_numpy(), group[quantity].to_numpy(),
                                n_boot=n_boot, seed=seed)
            for p in ("a", "m", "c"):
                lo, hi = getattr(fit, f"{p}_ci")
                row |= {p: getattr(fit, p), f"{p}_std": getattr(fit, f"{p}_std"),
                        f"{p}_lo": lo, f"{p}_hi": hi}
            row["rmse"] = fit.rmse
            if len(group) == MIN_WIDTHS:
                row["note"] = "3 widths for 3 parameters: bootstrap intervals not informative"
            rows.append(row)
    columns = ["k", "quantity", "n_widths", "a", "m", "c", "rmse", "a_std", "m_std", "c_std",
               "a_lo", "a_hi", "m_lo", "m_hi", "c_lo", "c_hi", "n_boot", "seed", "note",
               "grouping"]
    return pd.DataFrame(rows).reindex(columns=columns)


# ---------------------------------------------------------------- figure tables


def figure_groups(saes: pd.DataFrame, fits: pd.DataFrame
                  ) -> list[tuple[float, str, pd.DataFrame]]:
    """The groups ``collect`` fitted: by k, or by the target L0s its fits table lists."""
    return sparsity_groups(saes, sorted(fits.k.dropna().unique()))


def headline_group(groups: Sequence[tuple[float, str, pd.DataFrame]], headline_l0: float
                   ) -> tuple[float, str, pd.DataFrame]:
    """The group whose k (or target L0) is closest to ``headline_l0`` (the smaller on a tie)."""
    return min(groups, key=lambda g: (abs(g[0] - headline_l0), g[0]))


def _key(k: float) -> int | float:
    return int(k) if float(k).is_integer() else float(k)


def _fit_params(fits: pd.DataFrame, k: float, quantity: str) -> pd.Series:
    row = fits[(fits.k == k) & (fits.quantity == quantity)]
    if len(row) != 1 or not np.isfinite(row.iloc[0][["a", "m", "c"]].astype(float)).all():
        note = row.iloc[0].note if len(row) else "no fit"
        raise ScalingInputError(f"no power-law fit of {quantity} at k = {_key(k)} ({note})")
    return row.iloc[0]


def width_grid(widths: np.ndarray, extrapolate: float, points: int) -> np.ndarray:
    """Log-spaced widths from min/1.3 to max·extrapolate, with the measured widths included."""
    grid = np.geomspace(widths.min() / 1.3, widths.max() * extrapolate, points)
    return np.unique(np.concatenate([grid, widths.astype(float)]))


def figure1_table(saes: pd.DataFrame, fits: pd.DataFrame, headline_l0: float,
                  extrapolate: float, points: int) -> pd.DataFrame:
    """Headline decomposition at the group closest to ``headline_l0``: bands that sum to PL(W)."""
    k, grouping, group = headline_group(figure_groups(saes, fits), headline_l0)
    k = _key(k)
    fit = _fit_params(fits, k, "fvu")
    widths = group.width.to_numpy()
    grid = width_grid(widths, extrapolate, points)
    total = power_law(grid, fit.a, fit.m, fit.c)
    mean_nl = float(group.fvu_nonlinear.mean())
    pursuit_nl = np.interp(np.log(grid), np.log(widths), group.fvu_nonlinear_pursuit.to_numpy())
    measured = group.set_index("width").reindex(grid)
    table = pd.DataFrame({
        "k": k, "width": grid, "measured": np.isin(grid, widths),
        "extrapolated": grid > widths.max(), "total_fvu": total,
        "absent_features": total - fit.c, "linear_error": fit.c - mean_nl,
        "encoder_error": mean_nl - pursuit_nl, "nonlinear_error": pursuit_nl,
        "fvu": measured.fvu.to_numpy(), "fvu_nonlinear": measured.fvu_nonlinear.to_numpy(),
        "fvu_nonlinear_pursuit": measured.fvu_nonlinear_pursuit.to_numpy(),
        "fvu_nonlinear_mean": mean_nl,
        "linear_predictable_fraction": measured.linear_predictable_fraction.to_numpy(),
        "sae_id": measured.sae_id.to_numpy(),
        "a": fit.a, "m": fit.m, "c": fit.c, "c_lo": fit.c_lo, "c_hi": fit.c_hi,
        "n_widths": len(widths),
    })
    table["l0"], table["grouping"] = measured.l0.to_numpy(), grouping
    bands = table[["absent_features", "linear_error", "encoder_error", "nonlinear_error"]]
    negative = [name for name in bands if bool((bands[name] < 0).any())]
    table["note"] = f"negative band(s): {', '.join(negative)}" if negative else ""
    return table.loc[:, [c for c in table if c not in ("l0", "grouping")] + ["l0", "grouping"]]


def figure2_table(saes: pd.DataFrame, fits: pd.DataFrame, points: int) -> pd.DataFrame:
    """Long table: measured FVU / nonlinear FVU per SAE, the FVU power law and the NL mean per
    group (k, or target L0)."""
    groups = figure_groups(saes, fits)
    parts = []
    for quantity in ("fvu", "fvu_nonlinear"):
        for _, grouping, group in groups:
            part = group.loc[:, ["sae_id", "k", "width", "l0", quantity]]
            parts.append(part.rename(columns={quantity: "value"}).assign(
                quantity=quantity, kind="measured", grouping=grouping))
    for k, grouping, group in groups:
        grid = width_grid(group.width.to_numpy(), 1.3, points)
        row = fits[(fits.k == k) & (fits.quantity == "fvu")].iloc[0]
        if np.isfinite(float(row.a)):
            parts.append(pd.DataFrame({"k": k, "width": grid, "quantity": "fvu", "kind": "fit",
                                       "value": power_law(grid, row.a, row.m, row.c),
                                       "grouping": grouping}))
        parts.append(pd.DataFrame({"k": k, "width": grid, "quantity": "fvu_nonlinear",
                                   "kind": "mean", "value": group.fvu_nonlinear.mean(),
                                   "grouping": grouping}))
    columns = ["kind", "quantity", "k", "width", "value", "sae_id", "l0", "grouping"]
    return pd.concat(parts, ignore_index=True).reindex(columns=columns)


def figure5_table(saes: pd.DataFrame, l0_targets: Sequence[float] = ()) -> pd.DataFrame:
    """Per SAE of each group: held-out FVU split into linear, encoder and nonlinear error (they
    sum to FVU)."""
    groups = sparsity_groups(saes, l0_targets)
    table = pd.concat([group.assign(grouping=grouping) for _, grouping, group in groups])
    table = table.loc[:, ["sae_id", "k", "width", "mean_l0", "fvu_test", "fvu_nonlinear",
                   "fvu_nonlinear_pursuit", "fvu_pursuit", "fvu_sae_pursuit_rows",
                   "pursuit_rows", "l0", "grouping"]].sort_values(["k", "width"])
    table = table.reset_index(drop=True)
    table["linear_error"] = table.fvu_test - table.fvu_nonlinear
    table["encoder_error"] = table.fvu_nonlinear - table.fvu_nonlinear_pursuit
    table["nonlinear_error"] = table.fvu_nonlinear_pursuit
    bands = table[["linear_error", "encoder_error", "nonlinear_error"]]
    table["note"] = np.where((bands < 0).any(axis=1), "negative band", "")
    return table.loc[:, [c for c in table if c not in ("l0", "grouping")] + ["l0", "grouping"]]


def grid_table(saes: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per SAE of the width × k (or nominal L0) grid with the given value columns
    (Figures 3, 4); ``k`` is the SAE's ``l0``, which is its k in a TopK family."""
    saes = _with_l0(saes).assign(k=lambda t: t.l0)
    return saes.loc[:, ["sae_id", "width", "k", "mean_l0", *columns]].sort_values(["k", "width"])


def figure_table(n: int, saes: pd.DataFrame, fits: pd.DataFrame, headline_l0: float,
                 extrapolate: float, points: int) -> pd.DataFrame:
    if n == 1:
        return figure1_table(saes, fits, headline_l0, extrapolate, points)
    if n == 2:
        return figure2_table(saes, fits, points)
    if n == 3:
        return grid_table(saes, ["r2_error_vector", "r2_error_vector_pooled", "r2_error_norm"])
    if n == 4:
        return grid_table(saes, ["fvu", "fvu_nonlinear"])
    if n == 5:
        return figure5_table(saes, sorted(fits.k.dropna().unique()))
    raise ValueError(f"no Dark Matter figure {n}; saeflow builds {FIGURES}")


# ---------------------------------------------------------------- CLI


def write_csv(table: pd.DataFrame, path: str) -> None:
    with h5io.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")


def _parser() -> argparse.ArgumentParser:
    parser = cli.stage_parser("saeflow.dark_matter.scaling", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="per-SAE table and power-law fits of one family")
    for flag, text in [("--sae-ids", "SAE ids"), ("--sae-cfg", "their cfg.json files"),
                       ("--eval-metrics", "their evaluation metrics.json files"),
                       ("--split-metrics", "their error-split metrics.json files"),
                       ("--pursuit", "their pursuit.json files")]:
        c.add_argument(flag, nargs="+", required=True, help=f"{text}, in one order")
    c.add_argument("--saes-out", required=True, help="per-SAE table (.csv)")
    c.add_argument("--fits-out", required=True, help="power-law fits per k and quantity (.csv)")
    c.add_argument("--nominal-l0", nargs="+", type=float, default=None,
                   help="per SAE, in the same order: its k, or the nominal L0 of an SAE "
                   "without one (a pretrained release's)")
    c.add_argument("--l0-targets", nargs="+", type=float, default=[],
                   help="a family without a shared k: one group per target, the SAE whose "
                   "nominal L0 is closest to it at each width")
    c.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per fit")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    f = sub.add_parser("figure", help="one figure's table")
    f.add_argument("--figure", type=int, required=True, choices=FIGURES)
    f.add_argument("--saes", required=True, help="per-SAE table from collect")
    f.add_argument("--fits", required=True, help="power-law fits from collect")
    f.add_argument("--out", required=True, help="figure table (.csv)")
    f.add_argument("--headline-l0", type=float, default=32.0,
                   help="Figure 1 uses the family's k (or target L0) closest to this")
    f.add_argument("--extrapolate", type=float, default=4.0,
                   help="Figure 1 draws the fit up to this multiple of the widest SAE")
    f.add_argument("--points", type=int, default=60, help="widths on a fitted curve")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "collect":
        saes = collect(args.sae_ids, args.sae_cfg, args.eval_metrics, args.split_metrics,
                       args.pursuit, args.nominal_l0)
        fits = fit_table(saes, args.n_boot, args.seed, args.l0_targets)
        write_csv(saes, args.saes_out)
        write_csv(fits, args.fits_out)
        return
    saes, fits = pd.read_csv(args.saes), pd.read_csv(args.fits)
    table = figure_table(args.figure, saes, fits, args.headline_l0, args.extrapolate,
                         args.points)
    write_csv(table, args.out)


if __name__ == "__main__":
    main()
