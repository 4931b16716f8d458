"""MLSAE training throughput: saeflow's step against a re-creation of the original's.

``python benchmarks/bench_mlsae.py [--acts-dir DIR] [--out benchmarks/results/mlsae_cpu.json]``

The original (tim-lawson/mlsae) is not on PyPI and has no installable release, so its training
step is re-created here from ``mlsae/model/autoencoder.py`` and the Lightning module as the
reference describes them: ``nn.Linear`` encoder and decoder without bias plus a pre-encoder bias,
per-token standardisation, ``torch.topk(sorted=False)`` -> ReLU, the decoder as a sparse COO
product (its non-Triton path), loss = mean layer FVU + AuxK/32 over the top-256 dead latents,
autograd, ``unit_norm_decoder_gradient``, ``Adam(lr=1e-4, eps=6.25e-10)``, ``unit_norm_decoder``.
Both run on the same activations (``--acts-dir``: one cached file per layer; otherwise seeded
Gaussian activations), interleaved step by step in one process so machine load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import h5py
import torch
from host import host
from torch import nn

from saeflow.mlsae.trainer import MLSAETrainConfig, init_state, train_step


class OriginalMLSAE(nn.Module):
    """The original's module and loss, as its code computes them (no Triton on CPU)."""

    def __init__(self, d: int, m: int, k: int, auxk: int = 256) -> None:
        super().__init__()
        self.k, self.auxk = k, auxk
        self.encoder = nn.Linear(d, m, bias=False)
        self.decoder = nn.Linear(m, d, bias=False)
        self.pre_encoder_bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("last_nonzero", torch.zeros(m, dtype=torch.long))
        self.decoder.weight.data = self.encoder.weight.data.T.clone()
        self.decoder.weight.data /= self.decoder.weight.data.norm(dim=0)

    def _decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(values.shape[0]).repeat_interleave(values.shape[1])
        coo = torch.sparse_coo_tensor(torch.stack([rows, indices.reshape(-1)]),
                                      values.reshape(-1), (values.shape[0], self.decoder.weight.shape[1]))
        return torch.sparse.mm(coo, self.decoder.weight.T)

    def loss(self, x: torch.Tensor, dead_steps: int = 76) -> torch.Tensor:
        L, B, d = x.shape
        mu = x.mean(-1, keepdim=True)
        xs = x - mu
        xs = xs / (xs.std(-1, keepdim=True) + 1e-5)
        flat = xs.reshape(-1, d)
        latents = self.encoder(flat - self.pre_encoder_bias)
        vals, idx = torch.topk(latents, self.k, sorted=False)
        fired = torch.zeros_like(self.last_nonzero).scatter_add_(
            0, idx.reshape(-1), (vals > 1e-3).long().reshape(-1))
        self.last_nonzero *= 1 - fired.clamp(max=1)
        self.last_nonzero += 1
        dead = self.last_nonzero >= dead_steps
        latents.data *= dead
        recon = self._decode(vals.relu(), idx) + self.pre_encoder_bias
        err = (recon - flat).view(L, B, d)
        var = (xs - xs.mean(1, keepdim=True)).pow(2).sum((1, 2))
        loss = (err.pow(2).sum((1, 2)) / var).mean()
        av, ai = torch.topk(latents, self.auxk, sorted=False)
        e = (flat - recon).detach()
        e_hat = self._decode(av.relu(), ai)
        return loss + (1 / 32) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()

    @torch.no_grad()
    def after_backward(self) -> None:
        w, g = self.decoder.weight, self.decoder.weight.grad
        assert g is not None
        g -= (g * w).sum(0, keepdim=True) * w


def activations(acts_dir: str | None, n_layers: int, n: int, d: int) -> torch.Tensor:
    if acts_dir:
        files = sorted(Path(acts_dir).glob("blocks.*.hook_resid_post.h5"),
                       key=lambda p: int(p.name.split(".")[1]))[:n_layers]
        out = []
        for f in files:
            with h5py.File(f, "r") as h5:
                out.append(torch.from_numpy(h5["acts"][:n]))  # type: ignore[index]
        return torch.stack(out)
    return torch.randn(n_layers, n, d, generator=torch.Generator().manual_seed(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--acts-dir", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--expansion", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/mlsae_cpu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    x_all = activations(args.acts_dir, args.layers, args.batch * (args.steps + 1), 576)
    L, _, d = x_all.shape
    m = args.expansion * d
    cfg = MLSAETrainConfig(d_in=d, d_sae=m, k=args.k, layers=list(range(L)),
                           total_tokens=10**9, batch_size=args.batch, lr=1e-4)
    state = init_state(cfg, torch.zeros(d))
    orig = OriginalMLSAE(d, m, args.k)
    opt = torch.optim.Adam(orig.parameters(), lr=1e-4, eps=6.25e-10)
    times = {"saeflow": 0.0, "original": 0.0}
    for step in range(args.steps + 1):  # step 0 warms both up and is not timed
        x = x_all[:, step * args.batch : (step + 1) * args.batch]
        t0 = time.perf_counter()
        train_step(state, x, cfg)
        t1 = time.perf_counter()
        opt.zero_grad()
        orig.loss(x).backward()
        orig.after_backward()
        opt.step()
        orig.decoder.weight.data /= orig.decoder.weight.data.norm(dim=0)
        t2 = time.perf_counter()
        if step:
            times["saeflow"] += t1 - t0
            times["original"] += t2 - t1
    tokens = args.steps * args.batch
    result = {
        "host": host(), "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
        "note": "shared machine, loaded by other jobs: interleaved steps, same activations",
        "shape": {"layers": L, "batch_tokens": args.batch, "d": d, "d_sae": m, "k": args.k,
                  "steps": args.steps, "acts": args.acts_dir or "gaussian"},
        "tokens_per_s": {name: tokens / t for name, t in times.items()},
        "speedup": times["original"] / times["saeflow"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
