"""Stage: evaluate an MLSAE per layer, and its layer distributions and variance terms.

``python -m saeflow.mlsae.evaluate run --sae DIR --acts L0.h5 ... --layers 0 ... --model M
--tokens T.h5 --layer-csv OUT.csv --summary OUT.json --dists OUT.safetensors --variances OUT.csv``
``python -m saeflow.mlsae.evaluate table --summaries A.json ... --out tables/mlsae_metrics.csv``

Per layer (``layer-csv``): FVU, MSE, L1 (mean sum of latent activations), L0, dead fraction
(latents that never fire at that layer), and with the reconstruction spliced into the model at
that layer (positions >= skip): clean and spliced CE, ΔCE = CE_spliced - CE_clean and
KL(clean || spliced) per token (the original computed KL(spliced || clean)). The summary holds the
means over layers under ``sae_id``, the key of ``tables/sae_metrics.csv``. The dists file holds
``counts`` and ``totals`` [n_layers, n_latents] in the original's ``-dists.safetensors`` form;
``variances.csv`` the original's ``analysis/variances.py`` terms averaged over chunks of tokens.
Without ``--dists``/``--variances`` (a single-layer baseline) only the per-layer table and the
summary are written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import ExitStack

import h5py
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from saeflow import h5io
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.metrics import ReconstructionStats, log_probs, next_token_nll, spliced_ce_kl
from saeflow.mlsae.math import (
    dense_codes,
    layer_dists,
    reconstruct,
    summarise_dists,
    variance_terms,
)
from saeflow.mlsae.trainer import LoadedMLSAE, load_mlsae
from saeflow.models import load_model, resolve_site, spliced_logits


def reconstruction_pass(sae: LoadedMLSAE, paths: list[str], chunk: int,
                        dists: bool = True) -> dict:
    """Stream every layer's evaluation activations through the MLSAE, ``chunk`` tokens at a time.

    ``dists``: also accumulate the layer distributions and the variance terms (they need two
    layers or more; a single-layer baseline skips them).
    """
    n_layers, m = len(paths), sae.params.W_dec.shape[0]
    stats = [ReconstructionStats(sae.params.W_dec.shape[1]) for _ in paths]
    l1 = np.zeros(n_layers)
    counts = torch.zeros(n_layers, m, dtype=torch.float64)
    totals = torch.zeros_like(counts)
    terms = []
    with ExitStack() as stack:
        files = [stack.enter_context(h5io.open_checked(p, datasets={"acts": (None, None)}))
                 for p in paths]
        acts: list[h5py.Dataset] = [f["acts"] for f in files]  # type: ignore[misc]
        n = min(a.shape[0] for a in acts)
        for start in tqdm(range(0, n, chunk), desc="mlsae eval", unit="chunk"):
            x = torch.stack([torch.from_numpy(a[start : start + chunk]) for a in acts])
            with torch.inference_mode():
                recon, codes = reconstruct(sae.params, x, sae.k)  # (L, T, d), (L, T, k)
            for layer in range(n_layers):
                stats[layer].update(x[layer], recon[layer], (codes.values[layer] > 0).sum(-1))
            l1 += codes.values.double().sum(dim=(1, 2)).numpy()
            c, t = layer_dists(codes, n_layers, m)
            counts += c
            totals += t
            if dists:
                terms.append(variance_terms(dense_codes(codes, m)))
    rows = [{**s.result(), "l1": l1[i] / n, "dead_fraction": float((counts[i] == 0).double()
                                                                   .mean())}
            for i, s in enumerate(stats)]
    return {"rows": rows, "counts": counts, "totals": totals, "terms": terms,
            "dead_all_layers": float((counts.sum(0) == 0).double().mean())}


def spliced_losses(sae: LoadedMLSAE, model, layers: list[int], tokens: np.ndarray, skip: int,
                   batch_size: int) -> list[dict[str, float]]:
    """Clean and spliced CE and KL(clean || spliced) with the MLSAE's reconstruction at each of
    ``layers`` (one dict per layer, in order); the clean pass runs once per batch.

    The splice is :func:`saeflow.models.spliced_logits` (a forward hook on the module
    :func:`resolve_site` names for ``blocks.{layer}.hook_resid_post``).
    """
    params = type(sae.params)(*(p.to(model.device) for p in sae.params))

    def splice(hidden: torch.Tensor) -> torch.Tensor:
        return reconstruct(params, hidden, sae.k)[0]

    modules = [resolve_site(model, f"blocks.{layer}.hook_resid_post")[0] for layer in layers]
    sums = [{"ce_clean": 0.0, "ce_spliced": 0.0, "kl": 0.0} for _ in layers]
    n = 0
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            ids = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))
            ids = ids.to(model.device)
            logp = log_probs(model(ids).logits)  # the clean pass once per batch
            ce_clean = float(next_token_nll(logp, ids)[:, skip:].sum())
            for module, out in zip(modules, sums):
                ce, kl = spliced_ce_kl(logp, spliced_logits(model, module, ids, skip, splice), ids)
                out["ce_clean"] += ce_clean
                out["ce_spliced"] += float(ce[:, skip:].sum())
                out["kl"] += float(kl[:, skip:].sum())  # KL(clean || spliced) per prediction
            n += ids.shape[0] * (ids.shape[1] - 1 - skip)
    results = []
    for out in sums:
        mean = {key: value / n for key, value in out.items()}
        mean["delta_ce"] = mean["ce_spliced"] - mean["ce_clean"]
        results.append(mean)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.mlsae.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate one MLSAE")
    r.add_argument("--sae", required=True, help="MLSAE folder (either layout)")
    r.add_argument("--acts", nargs="+", required=True, help="evaluation activations per layer")
    r.add_argument("--layers", nargs="+", type=int, required=True, help="their layers")
    r.add_argument("--model", required=True, help="model folder or id")
    r.add_argument("--tokens", required=True, help="evaluation tokens file")
    r.add_argument("--sae-id", required=True, help="id recorded in the outputs")
    r.add_argument("--downstream-seqs", type=int, default=4, help="sequences for CE/KL (0: skip)")
    r.add_argument("--batch-size", type=int, default=4, help="sequences per forward")
    r.add_argument("--skip-positions", type=int, default=1, help="leading positions not spliced")
    r.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk")
    for name in ("layer-csv", "summary"):
        r.add_argument(f"--{name}", required=True, help=f"output: {name}")
    for name in ("dists", "variances"):
        r.add_argument(f"--{name}", default=None,
                       help=f"output: {name} (two layers or more; omitted for a baseline)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    r.add_argument("--device", default="cpu", help=DEVICE_HELP)
    t = sub.add_parser("table", help="one row per MLSAE from the summaries")
    t.add_argument("--summaries", nargs="+", required=True, help="summary JSON files")
    t.add_argument("--layer-csvs", nargs="+", required=True, help="per-layer CSV files")
    t.add_argument("--variances", nargs="+", required=True, help="variances CSV files")
    t.add_argument("--out", required=True, help="tables/mlsae_metrics.csv")
    t.add_argument("--out-layers", required=True, help="tables/mlsae_layers.csv")
    t.add_argument("--out-variances", required=True, help="tables/mlsae_variances.csv")
    t.add_argument("--dists", nargs="+", required=True, help="dists.safetensors files")
    t.add_argument("--sae-ids", nargs="+", required=True, help="their MLSAE ids")
    t.add_argument("--out-sweep", required=True, help="tables/mlsae_sweep.csv")
    t.add_argument("--out-layer-std", required=True, help="tables/mlsae_layer_std.csv")
    return p


def run(args: argparse.Namespace) -> None:
    if len(args.acts) != len(args.layers):
        raise SystemExit(f"--acts gives {len(args.acts)} files for {len(args.layers)} --layers")
    sae = load_mlsae(args.sae)
    if sae.layers != args.layers:
        raise SystemExit(f"{args.sae}: trained on layers {sae.layers}, asked for {args.layers}")
    if (args.dists is None) != (args.variances is None):
        raise SystemExit("give both --dists and --variances, or neither")
    with_dists = args.dists is not None
    if with_dists and len(args.layers) < 2:
        raise SystemExit(f"--dists/--variances need two layers or more, got {args.layers}")
    result = reconstruction_pass(sae, args.acts, args.chunk_tokens, dists=with_dists)
    rows = [{"sae_id": args.sae_id, "layer": layer, **row}
            for layer, row in zip(args.layers, result["rows"])]
    if args.downstream_seqs > 0:
        device = resolve_device(args.device)
        model, _ = load_model(args.model, device=device)
        with h5io.open_checked(args.tokens, datasets={"tokens": (None, None)}) as f:
            tokens = np.asarray(f["tokens"][: args.downstream_seqs])  # type: ignore[index]
        losses = spliced_losses(sae, model, args.layers, tokens, args.skip_positions,
                                args.batch_size)
        for row, loss in zip(rows, losses):
            row.update(loss)
    _write_outputs(args, rows, result, sae)


def _write_outputs(args: argparse.Namespace, rows: list[dict], result: dict,
                   sae: LoadedMLSAE) -> None:
    table = pd.DataFrame(rows)
    with h5io.atomic_path(args.layer_csv) as tmp:
        table.to_csv(tmp, index=False)
    numbers = table.drop(columns=["sae_id", "layer"])
    means = {str(c): float(numbers[c].to_numpy().mean()) for c in numbers.columns}
    summary = {"sae_id": args.sae_id, "n_layers": len(rows), "k": sae.k,
               "d_sae": int(sae.params.W_dec.shape[0]), "d_in": int(sae.params.W_dec.shape[1]),
               **{f"mean_{key}": value for key, value in means.items()},
               "max_layer_fvu": float(table["fvu"].to_numpy().max()),
               "dead_all_layers": result["dead_all_layers"]}
    h5io.write_json(args.summary, summary)
    if args.dists is None:
        return
    with h5io.atomic_path(args.dists) as tmp:
        save_file({"counts": result["counts"].float(), "totals": result["totals"].float()},
                  str(tmp))
    terms = {name: float(np.mean([getattr(t, name) for t in result["terms"]]))
             for name in result["terms"][0]._fields}
    variances = {"sae_id": args.sae_id, "n_layers": len(rows), "k": sae.k,
                 "n_latents": summary["d_sae"], **terms,
                 "headline_ratio": terms["exp_var_l_f"] / terms["exp_var_l_tf"]}
    with h5io.atomic_path(args.variances) as tmp:
        pd.DataFrame([variances]).to_csv(tmp, index=False)


SWEEP_COLUMNS: tuple[str, ...] = ("mean_fvu", "max_layer_fvu", "mean_mse", "mean_l1",
                                   "mean_mean_l0", "mean_delta_ce", "mean_kl",
                                   "dead_all_layers")
"""Columns of the sweep table (the original's ``figures/test.py`` FVU/MSE/L1/ΔCE/KL)."""


def sweep_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """One row per MLSAE with its expansion factor and k, sorted by (expansion factor, k): the
    original's ``test_{model}_k.csv`` and ``_expansion_factor.csv`` in one table."""
    out = pd.DataFrame({"sae_id": summaries["sae_id"]})
    out["expansion_factor"] = summaries["d_sae"] / summaries["d_in"]
    out["k"] = summaries["k"]
    out["n_latents"] = summaries["d_sae"]
    for col in SWEEP_COLUMNS:
        if col in summaries:
            out[col] = summaries[col]
    return out.sort_values(by=["expansion_factor", "k", "sae_id"], kind="stable")


def layer_std_row(sae_id: str, totals: torch.Tensor) -> dict[str, float | int | str]:
    """The original's ``dists_layer_std.csv`` row: moments of the per-latent layer std over the
    latents that fired (NaN ones left out, as its ``np.nan*``); ``*_rel`` divided by n_layers.
    Its sem divides by all latents (``len(layer_std)``), this one by the latents that fired."""
    n_layers = totals.shape[0]
    std = summarise_dists(totals.double()).layer_std
    std = std[~std.isnan()]
    n = std.numel()
    var = float(std.var(unbiased=False)) if n else float("nan")
    row: dict[str, float | int | str] = {
        "sae_id": sae_id, "n_layers": n_layers, "n_latents": totals.shape[1], "n_fired": n,
        "mean": float(std.mean()) if n else float("nan"), "var": var, "std": var**0.5,
        "sem": var**0.5 / n**0.5 if n else float("nan")}
    for key in ("mean", "std", "sem"):
        row[f"{key}_rel"] = float(row[key]) / n_layers
    return row


def table(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    if len(args.dists) != len(args.sae_ids):
        raise SystemExit(f"--dists gives {len(args.dists)} files for {len(args.sae_ids)} "
                         "--sae-ids")
    summaries = pd.DataFrame([json.loads(Path(p).read_text()) for p in args.summaries])
    layer_std = pd.DataFrame([layer_std_row(i, load_file(p)["totals"])
                              for i, p in zip(args.sae_ids, args.dists)])
    outputs = [
        (args.out, summaries),
        (args.out_layers, pd.concat([pd.read_csv(p) for p in args.layer_csvs])),
        (args.out_variances, pd.concat([pd.read_csv(p) for p in args.variances])),
        (args.out_layer_std, layer_std),
    ]
    with h5io.atomic_path(args.out_sweep) as tmp:
        sweep_table(summaries).to_csv(tmp, index=False)
    for path, frame in outputs:
        with h5io.atomic_path(path) as tmp:
            frame.sort_values("sae_id", kind="stable").to_csv(tmp, index=False)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
