"""Stage: evaluate an SAE on cached activations, the Dark Matter code's SAEInfoObject as files.

``python -m saeflow.sae_eval evaluate --sae DIR --acts A.h5 --model DIR --tokens T.h5 --site S --out E.h5 --metrics M.json``
``python -m saeflow.sae_eval summarize --metrics M1.json M2.json ... --out tables/sae_metrics.csv``

Per token (rows of the activations file), ``E.h5`` holds:

``latent_ptr`` int64 [n+1], ``latent_idx`` int32 [nnz], ``latent_val`` float32 [nnz]
    the active latents in CSR form: token t's latents are ``latent_idx[ptr[t]:ptr[t+1]]``.
``error``         float32 [n, d]  Sae(x) - x (the sign used by the Dark Matter code)
``error_sq_norm`` float32 [n]     ||Sae(x) - x||^2
``l0``            int32   [n]     number of active latents
``act_norm``      float32 [n]     ||x||
``tokens``        int32   [n]     token ids, copied from the activations file
Per latent: ``latent_freq`` (fraction of tokens on which it fires) and ``latent_mean_act``
(mean activation when active), both float64 [d_sae].

``M.json`` holds FVU, MSE, mean L0, dead and alive fractions, and the downstream loss with the
reconstruction spliced into the model at the SAE's site: clean, spliced and zero-ablated CE,
the CE-loss score and the KL score (definitions in :mod:`saeflow.metrics`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from saeflow import h5io
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.metrics import (
    ReconstructionStats,
    log_probs,
    next_token_nll,
    recovered_score,
    spliced_ce_kl,
)
from saeflow.models import load_model, resolve_site, spliced_logits
from saeflow.saes import load_sae


@dataclass
class SparseLatents:
    """Active latents of a chunk of tokens: CSR row counts, indices and values."""

    counts: np.ndarray  # [n] int
    idx: np.ndarray  # [nnz] int32
    val: np.ndarray  # [nnz] float32


def sparsify(latents: torch.Tensor) -> SparseLatents:
    """Dense latents [n, d_sae] -> CSR parts (row-major order of non-zeros)."""
    rows, cols = latents.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=latents.shape[0])
    return SparseLatents(counts.numpy(), cols.int().numpy(), latents[rows, cols].float().numpy())


def encode_chunk(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [n, d_sae] and reconstruction [n, d] of activations ``x`` [n, d]."""
    with torch.inference_mode():
        latents = sae.encode(x)
        return latents, sae.decode(latents)


def _ds(h5: h5py.File | h5py.Group, name: str) -> h5py.Dataset:
    """``h5[name]`` typed as the dataset it is (h5py types it as any member kind)."""
    member = h5[name]
    if not isinstance(member, h5py.Dataset):
        raise TypeError(f"{h5.file.filename}: '{name}' is not a dataset")
    return member


class _Outputs:
    """The per-token datasets of an evaluation file, filled chunk by chunk."""

    def __init__(self, h5: h5py.File, n: int, d: int, d_sae: int, chunk: int,
                 csr_max_l0: float | None = None) -> None:
        self.h5, self.nnz, self.n, self.csr_max_l0 = h5, 0, n, csr_max_l0
        self.store_csr: bool | None = None  # decided on the first chunk
        h5.create_dataset("error", (n, d), "float32", chunks=(chunk, d))
        for name, dtype in [("error_sq_norm", "float32"), ("l0", "int32"),
                            ("act_norm", "float32"), ("tokens", "int32")]:
            h5.create_dataset(name, (n,), dtype)
        self.freq = np.zeros(d_sae, dtype=np.float64)
        self.act_sum = np.zeros(d_sae, dtype=np.float64)

    def _start_csr(self, counts: np.ndarray) -> None:
        """Store the CSR triple unless the first chunk's mean L0 is above ``csr_max_l0``: a
        dense-L0 SAE's (ReLU, JumpReLU, Gated: L0 ~ d_sae / 2) takes 8 bytes per active latent,
        more than the dense latents, and no stage reads it (only ``SAEInfo.latents``)."""
        mean_l0 = float(counts.mean()) if len(counts) else 0.0
        self.store_csr = self.csr_max_l0 is None or mean_l0 <= self.csr_max_l0
        self.h5.attrs["latents_stored"] = self.store_csr
        if not self.store_csr:
            self.h5.attrs["latents_skipped_why"] = (
                f"mean L0 {mean_l0:.1f} on the first chunk > csr_max_l0 {self.csr_max_l0}")
            return
        self.h5.create_dataset("latent_ptr", (self.n + 1,), "int64")
        _ds(self.h5, "latent_ptr")[0] = 0
        for name, dtype in [("latent_idx", "int32"), ("latent_val", "float32")]:
            self.h5.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(1 << 16,))

    def write(self, start: int, x: torch.Tensor, recon: torch.Tensor,
              latents: torch.Tensor, tokens: np.ndarray) -> None:
        err = (recon - x).float()
        sparse = sparsify(latents)
        stop = start + len(x)
        _ds(self.h5, "error")[start:stop] = err.numpy()
        _ds(self.h5, "error_sq_norm")[start:stop] = err.pow(2).sum(-1).numpy()
        _ds(self.h5, "l0")[start:stop] = sparse.counts
        _ds(self.h5, "act_norm")[start:stop] = x.norm(dim=-1).numpy()
        _ds(self.h5, "tokens")[start:stop] = tokens
        if self.store_csr is None:
            self._start_csr(sparse.counts)
        if self.store_csr:
            _ds(self.h5, "latent_ptr")[start + 1 : stop + 1] = self.nnz + np.cumsum(sparse.counts)
            for name, values in [("latent_idx", sparse.idx), ("latent_val", sparse.val)]:
                _ds(self.h5, name).resize((self.nnz + len(values),))
                _ds(self.h5, name)[self.nnz :] = values
        self.nnz += len(sparse.idx)
        np.add.at(self.freq, sparse.idx, 1.0)
        np.add.at(self.act_sum, sparse.idx, sparse.val.astype(np.float64))


def evaluate_reconstruction(sae, acts_path: str, out_path: str, chunk: int, attrs: dict,
                            csr_max_l0: float | None = None) -> dict:
    """Stream the activations file through the SAE (on its device); write ``out_path``; return
    metrics. The CSR latents are left out when the first chunk's mean L0 exceeds ``csr_max_l0``."""
    d_sae = sae.cfg.d_sae
    with h5io.open_checked(acts_path, datasets={"acts": (None, sae.cfg.d_in)}) as acts_file, \
            h5io.atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        acts, tokens = _ds(acts_file, "acts"), _ds(acts_file, "tokens")
        n = acts.shape[0]
        out = _Outputs(h5, n, sae.cfg.d_in, d_sae, min(chunk, n), csr_max_l0)
        stats = ReconstructionStats(sae.cfg.d_in)
        for start in tqdm(range(0, n, chunk), desc="sae eval", unit="chunk"):
            x = torch.from_numpy(acts[start : start + chunk])
            latents, recon = (t.cpu() for t in encode_chunk(sae, x.to(sae.device)))
            out.write(start, x, recon, latents, tokens[start : start + chunk])
            stats.update(x, recon, (latents != 0).sum(-1))
        h5["latent_freq"] = out.freq / n
        h5["latent_mean_act"] = np.divide(out.act_sum, out.freq, out=np.zeros(d_sae),
                                          where=out.freq > 0)
        h5io.write_attrs(h5, {**attrs, "acts_file": str(acts_path), "d_sae": d_sae})
        h5io.mark_complete(h5)
    dead = float((out.freq == 0).mean())
    return {**stats.result(), "dead_fraction": dead, "alive_fraction": 1.0 - dead}


def downstream_loss(sae, model, site: str, tokens: np.ndarray, skip: int, batch_size: int) -> dict:
    """Clean, SAE-spliced and zero-ablated CE and KL over positions >= skip."""
    module = resolve_site(model, site)[0]
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_ablated": 0.0, "kl_sae": 0.0, "kl_ablated": 0.0}
    n = 0
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            ids = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))
            ids = ids.to(model.device)
            # next-token loss at position p predicts token p+1; count predictions made at p >= skip
            logp = log_probs(model(ids).logits)
            sums["ce_clean"] += float(next_token_nll(logp, ids)[:, skip:].sum())
            for key, replace in [("sae", sae), ("ablated", torch.zeros_like)]:
                ce, kl = spliced_ce_kl(logp, spliced_logits(model, module, ids, skip, replace), ids)
                sums[f"ce_{key}"] += float(ce[:, skip:].sum())
                sums[f"kl_{key}"] += float(kl[:, skip:].sum())
            n += ids.shape[0] * (ids.shape[1] - 1 - skip)
    means = {key: value / n for key, value in sums.items()}
    means["ce_loss_score"] = recovered_score(means["ce_clean"], means["ce_sae"], means["ce_ablated"])
    means["kl_score"] = recovered_score(0.0, means["kl_sae"], means["kl_ablated"])
    means["downstream_tokens"] = n
    return means


def error_sae_row(cfg_path: str | Path) -> dict:
    """A table row for an error SAE of Figure 8 (``saes/{base}-{component}_error/cfg.json``).

    It reconstructs a part of another SAE's error, not the activations, so it has no
    evaluation file: its numbers are the trainer's last logged window (FVU of the component,
    dead fraction), and ``trained_on`` says what it reconstructs.
    """
    cfg = json.loads(Path(cfg_path).read_text())
    meta = cfg["metadata"]
    source, stats = meta["saeflow_error_sae"], meta.get("saeflow_train_stats", {})
    return {"sae_id": Path(cfg_path).parent.name,
            "trained_on": f"{source['component']} error of {source['base_sae_id']}",
            "metrics_from": "training", "site": meta.get("hook_name"), "d_sae": cfg["d_sae"],
            "fvu": stats.get("fvu"), "mean_l0": stats.get("l0"),
            "dead_fraction": stats.get("dead_fraction"), "n_tokens": stats.get("tokens")}


def summarize(metrics_paths: Sequence[str], out: str,
              error_sae_cfgs: Sequence[str] = ()) -> pd.DataFrame:
    """One row per SAE from its metrics files, plus one per error SAE (Figure 8) from its
    cfg.json, sorted by SAE id, written as CSV; ``trained_on`` says what each reconstructs."""
    rows = [{**json.loads(Path(p).read_text()), "trained_on": "activations",
             "metrics_from": "evaluation"} for p in metrics_paths]
    rows += [error_sae_row(p) for p in error_sae_cfgs]
    table = pd.DataFrame(rows).sort_values("sae_id").reset_index(drop=True)
    with h5io.atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return table


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m saeflow.sae_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("evaluate", help="evaluate one SAE on one activations file")
    p.add_argument("--sae", required=True, help="SAE folder in the SAELens layout")
    p.add_argument("--acts", required=True, help="activations file at the SAE's site")
    p.add_argument("--model", required=True, help="model folder or id, for the downstream loss")
    p.add_argument("--tokens", required=True, help="tokens file for the downstream loss")
    p.add_argument("--site", required=True, help="hook site the SAE reads and is spliced into")
    p.add_argument("--out", required=True, help="per-token evaluation file (.h5)")
    p.add_argument("--metrics", required=True, help="per-SAE metrics (.json)")
    p.add_argument("--downstream-seqs", type=int, default=16, help="sequences for CE/KL (0: skip)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per downstream forward")
    p.add_argument("--skip-positions", type=int, default=1, help="leading positions not spliced")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per encode chunk")
    p.add_argument("--csr-max-l0", type=float, default=None,
                   help="leave the CSR latents out above this mean L0 (default: always store)")
    p.add_argument("--sae-id", default="", help="recorded in the outputs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s = sub.add_parser("summarize", help="collect metrics files into one CSV table")
    s.add_argument("--metrics", nargs="+", required=True, help="metrics files")
    s.add_argument("--out", required=True, help="CSV table")
    s.add_argument("--error-saes", nargs="*", default=[],
                   help="cfg.json of error SAEs (Figure 8), listed from their training stats")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    sae = load_sae(args.sae).to(device)
    with h5io.open_checked(args.tokens, datasets={"tokens": (None, None)}) as tok_file:
        tokens = _ds(tok_file, "tokens")[: args.downstream_seqs]
    attrs = {"sae_id": args.sae_id, "site": args.site}
    metrics = evaluate_reconstruction(sae, args.acts, args.out, args.chunk_tokens, attrs,
                                      args.csr_max_l0)
    if args.downstream_seqs > 0:
        model, _ = load_model(args.model, device=device)
        metrics |= downstream_loss(sae, model, args.site, tokens, args.skip_positions,
                                   args.batch_size)
    h5io.write_json(args.metrics, {**attrs, **metrics})


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        evaluate(args)
    else:
        summarize(args.metrics, args.out, args.error_saes)


if __name__ == "__main__":
    main()
