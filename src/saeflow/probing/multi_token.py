"""Stages of the multi-token regime: all-position activations, the probes over them, the figure.

``python -m saeflow.probing.multi_token acts --model DIR --site S --dataset D --out D.h5 [...]``
``python -m saeflow.probing.multi_token probe --acts D.h5 [...] --site S [--sae DIR --sae-id ID] --out O.csv``
``python -m saeflow.probing.multi_token figure --results O.csv [...] --table T.csv --pdf T.pdf``

As the original's ``generate_model_and_sae_multi_token_acts.py`` + ``run_multi_token_acts.py``
(reference B2/B3): every position of each prompt (left-truncated to ``max_length``; the original
256) at one site, written batch by batch into ``acts/{site}`` float32 [n, T, d] (T = the longest
kept prompt, zero padded; ``n_tokens`` [n]), so the job holds one batch, not the dataset.

Probes, on the normal regime's seeded split: ``attn_probe`` (:mod:`saeflow.probing.attention`),
``last_token`` (the L2 logreg of the other regimes on the last real position), ``mean_pool``
(L2 logreg on the mean over positions 1..last), ``concat`` (the original's baseline: a 20-dim
PCA per position 1..T-1 fitted on the training rows, concatenated, L1 logreg) and per SAE
``sae_mean`` / ``sae_max`` (the original's ``sae_aggregated``: latents encoded at every position,
mean- or max-pooled over positions 1..last, the top k by the ranking of
:func:`saeflow.probing.run.rank_latents`, L1 logreg). The original's check
``"sae" in to_run_list`` never matched its own CLI choice ``sae_aggregated`` (B9.6), so its
aggregated SAE probes never ran from the command line; here they run whenever an SAE is
given. Position 0 is left out of every probe (the original pooled 1..last; SmolLM2's first
position has a far larger norm than any other), and the attention probe's inputs are divided
by the training rows' mean token norm (a scalar: the same probes, better conditioned for the
original's Adam lr 1e-4).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from nnsight import NNsight
from tqdm import tqdm

from saeflow import h5io
from saeflow.activations import capture_batch
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.figures.pdf import read_table, save_pdf
from saeflow.probing import probe, regimes
from saeflow.probing.acts import pad_right, tokenize
from saeflow.probing.attention import concat_pca, fit_attention, pool
from saeflow.probing.datasets import load, parse_custom
from saeflow.probing.run import rank_latents

RESULT_COLUMNS = ["dataset", "method", "sae_id", "k", "test_auc", "val_auc", "layer"]
METHOD_ORDER = ["last_token", "mean_pool", "concat", "attn_probe", "sae_mean", "sae_max"]


def write_all_positions(path: str, traced, model, seqs: Sequence[Sequence[int]], site: str,
                        batch_tokens: int, pad_id: int, y: np.ndarray, attrs: dict) -> None:
    """Every position of every sequence at ``site`` into ``path``, one batch in memory at a time."""
    lengths = np.array([len(s) for s in seqs])
    order = np.argsort(lengths, kind="stable")
    width, d = int(lengths.max()), int(model.config.hidden_size)
    with h5io.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        out = h5.create_dataset(f"acts/{site}", shape=(len(seqs), width, d), dtype="float32",
                                chunks=(1, width, d), fillvalue=0.0)
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * lengths[order[stop]] <= batch_tokens:
                stop += 1
            rows = np.sort(order[start:stop])  # h5py writes increasing indices
            ids, _ = pad_right([seqs[i] for i in rows], pad_id)
            acts = capture_batch(traced, model, ids.to(model.device), [site])[site]
            block = np.zeros((len(rows), width, d), dtype=np.float32)
            block[:, : ids.shape[1]] = acts.float().cpu().numpy()
            block[np.arange(width)[None, :] >= lengths[rows][:, None]] = 0.0
            out[rows] = block
            start = stop
        h5.create_dataset("y", data=y.astype(np.int64))
        h5.create_dataset("n_tokens", data=lengths.astype(np.int32))
        h5io.write_attrs(h5, {**attrs, "sites": [site]})
        h5io.mark_complete(h5)


def read_all_positions(path: str, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acts float32 [n, T, d], n_tokens [n], y [n]) of a file of :func:`write_all_positions`."""
    with h5io.open_checked(path, datasets={"y": (None,), "n_tokens": (None,)}) as h5:
        data = h5.get(f"acts/{site}")
        if not isinstance(data, h5py.Dataset) or data.ndim != 3:
            raise h5io.InputFileError(f"{path}: no all-position activations for site '{site}'")
        return np.asarray(data), np.asarray(h5["n_tokens"]), np.asarray(h5["y"])


def sae_pooled(sae, x: np.ndarray, lengths: np.ndarray, batch_rows: int = 16
               ) -> tuple[np.ndarray, np.ndarray]:
    """(mean-, max-pooled) SAE latents [n, d_sae] over positions 1..last, ``batch_rows`` rows at
    a time (a batch's [b, T, d_sae] latents are the largest array held)."""
    means, maxes = [], []
    with torch.inference_mode():
        for start in range(0, len(x), batch_rows):
            xb = torch.from_numpy(x[start : start + batch_rows])
            z = sae.encode(xb.reshape(-1, xb.shape[-1]).float()).reshape(*xb.shape[:2], -1)
            z = z.cpu().numpy()
            means.append(pool(z, lengths[start : start + batch_rows], "mean"))
            maxes.append(pool(z, lengths[start : start + batch_rows], "max"))
    return np.concatenate(means), np.concatenate(maxes)


def drop_first(x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x without position 0, real positions per row); a row of one token keeps it."""
    if x.shape[1] == 1:
        return x, lengths
    x_in = x[:, 1:].copy()
    single = lengths == 1
    x_in[single, 0] = x[single, 0]
    return x_in, np.maximum(lengths - 1, 1)


def probe_dataset(name: str, x: np.ndarray, lengths: np.ndarray, y: np.ndarray, layer: int,
                  saes: Sequence[tuple[str, object]], k: int, epochs: int, lr: float,
                  seed: int) -> list[dict]:
    """The multi-token probes of one dataset on its normal split (one row per probe)."""
    (sp,) = regimes.splits(y, "normal", seed=seed)
    tr, te = sp.train, sp.test
    x_in, len_in = drop_first(x, lengths)
    rows = []

    def add(method: str, test_auc: float, val_auc: float, sae_id: str = "", kk: int = 0) -> None:
        rows.append({"dataset": name, "method": method, "sae_id": sae_id, "k": kk,
                     "test_auc": test_auc, "val_auc": val_auc, "layer": layer})

    last = x[np.arange(len(y)), lengths - 1]
    for method, feats in (("last_token", last), ("mean_pool", pool(x, lengths, "mean"))):
        (m,) = probe.select_logreg(feats[tr], sp.y_train, feats[te], y[te], "l2", seed=seed)
        add(method, m.test_auc, m.val_auc)
    f_tr, f_te = concat_pca(x[tr], x[te])
    (m,) = probe.select_logreg(f_tr, sp.y_train, f_te, y[te], "l1", seed=seed)
    add("concat", m.test_auc, m.val_auc)
    real = np.arange(x_in.shape[1])[None, :] < len_in[:, None]
    scale = float(np.linalg.norm(x_in[tr][real[tr]], axis=-1).mean()) or 1.0
    res = fit_attention(x_in[tr] / scale, len_in[tr], sp.y_train, x_in[te] / scale, len_in[te],
                        y[te], epochs=epochs, lr=lr, seed=seed)
    add("attn_probe", res.test_auc, res.val_auc)
    for sae_id, sae in saes:
        for method, z in zip(("sae_mean", "sae_max"), sae_pooled(sae, x, lengths)):
            kk = min(k, z.shape[1])
            order = rank_latents(z[tr], sp.y_train)[:kk]
            (m,) = probe.select_logreg(z[tr][:, order], sp.y_train, z[te][:, order], y[te], "l1",
                                       seed=seed)
            add(method, m.test_auc, m.val_auc, sae_id, kk)
    return rows


def figure_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method) the test AUC (the best SAE by validation AUC for the SAE methods),
    and a ``mean`` row per method over the datasets."""
    best = results.sort_values("val_auc", ascending=False, kind="stable").groupby(
        ["dataset", "method"], as_index=False).first()
    table = pd.DataFrame(best[["dataset", "method", "sae_id", "test_auc", "val_auc"]])
    mean = pd.DataFrame(table.groupby("method", as_index=False)[["test_auc", "val_auc"]].mean())
    table = pd.concat([table, mean.assign(dataset="mean", sae_id="")], ignore_index=True)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return table.sort_values(["dataset", "method"], key=lambda s: s.map(rank) if s.name ==
                             "method" else s, kind="stable").reset_index(drop=True)


def draw(table: pd.DataFrame):
    def paint(fig: Figure) -> None:
        ax = fig.subplots()
        datasets = list(dict.fromkeys(table["dataset"]))
        methods = [m for m in METHOD_ORDER if m in set(table["method"])]
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            part = table[table["method"] == method].set_index("dataset").reindex(datasets)
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(datasets))],
                   part["test_auc"], width, label=method)
        ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
        ax.set_ylabel("test AUC")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    return paint


def _acts(args: argparse.Namespace) -> None:
    from saeflow.models import load_model, resolve_site

    custom = parse_custom(args.custom)
    data = {name: load(name, custom, max_rows=args.max_rows) for name in args.dataset}
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    resolve_site(model, args.site)
    traced = NNsight(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad) if isinstance(pad, int) else 0
    with torch.inference_mode():
        for name, out in tqdm(list(zip(args.dataset, args.out)), desc="datasets", unit="ds"):
            seqs = tokenize(tokenizer, data[name].prompts, args.max_length)
            write_all_positions(out, traced, model, seqs, args.site, args.batch_tokens, pad_id,
                                data[name].y, {"model": args.model_name or args.model,
                                               "dataset": name, "max_length": args.max_length})


def _probe(args: argparse.Namespace) -> None:
    from saeflow.saes import load_sae

    if len(args.sae) != len(args.sae_id):
        raise SystemExit(f"got {len(args.sae)} --sae but {len(args.sae_id)} --sae-id")
    saes = [(i, load_sae(p)) for p, i in zip(args.sae, args.sae_id)]
    rows: list[dict] = []
    for path in tqdm(args.acts, desc="multi-token probes", unit="ds"):
        x, lengths, y = read_all_positions(path, args.site)
        rows += probe_dataset(Path(path).stem, x, lengths, y, args.layer, saes, args.k,
                              args.epochs, args.lr, args.seed)
    with h5io.atomic_path(args.out) as tmp:
        pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(tmp, index=False)


def _figure(args: argparse.Namespace) -> None:
    results = pd.concat([read_table(r, RESULT_COLUMNS) for r in args.results])
    with h5io.atomic_path(args.table) as tmp:
        figure_table(results).to_csv(tmp, index=False)
    save_pdf(draw(read_table(args.table, ["dataset", "method", "test_auc"])), args.table,
             args.pdf, 6.0, 3.2, 9)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.probing.multi_token", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("acts", help="all-position activations")
    a.add_argument("--model", required=True)
    a.add_argument("--model-name", default="")
    a.add_argument("--site", required=True)
    a.add_argument("--dataset", action="append", required=True)
    a.add_argument("--out", action="append", required=True, help="one per --dataset")
    a.add_argument("--custom", action="append", default=[], help="NAME=PATH of a prompt,target CSV")
    a.add_argument("--max-rows", type=int, default=None)
    a.add_argument("--max-length", type=int, default=256, help="positions kept (left truncation)")
    a.add_argument("--batch-tokens", type=int, default=4096)
    a.add_argument("--dtype", default="float32")
    a.add_argument("--device", default="cpu", help=DEVICE_HELP)
    b = sub.add_parser("probe", help="attention, pooled and SAE-aggregated probes")
    b.add_argument("--acts", action="append", required=True)
    b.add_argument("--site", required=True)
    b.add_argument("--layer", type=int, required=True)
    b.add_argument("--sae", action="append", default=[], help="SAE folder (repeat)")
    b.add_argument("--sae-id", action="append", default=[], help="one per --sae")
    b.add_argument("--k", type=int, default=128, help="latents of the aggregated SAE probes")
    b.add_argument("--epochs", type=int, default=1000)
    b.add_argument("--lr", type=float, default=1e-4)
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--out", required=True)
    f = sub.add_parser("figure", help="the comparison table and figure")
    f.add_argument("--results", action="append", required=True)
    f.add_argument("--table", required=True)
    f.add_argument("--pdf", required=True)
    for q in (a, b):
        q.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.command == "acts":
        if len(args.dataset) != len(args.out):
            p.error(f"got {len(args.dataset)} --dataset but {len(args.out)} --out")
        _acts(args)
    elif args.command == "probe":
        _probe(args)
    else:
        _figure(args)


if __name__ == "__main__":
    main()
