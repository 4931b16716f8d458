"""How far the default's MLSAE is from FVU < 0.3 at every layer, and why (not a timed test).

``python benchmarks/scan_mlsae_fvu.py [--acts results/mlsae/acts/smollm2] [--runs 2x32 4x64 ...]``

Trains MLSAEs with saeflow's trainer (:func:`saeflow.mlsae.trainer.train_mlsae`) on the default's
cached training layers (``news_mlsae``: 24,576 tokens x 30 layers, built by
``snakemake -c2 --until cache_mlsae_activations``) for each ``R x k`` run, then prints the
held-out FVU of every layer on ``news_mlsae_eval`` (raw space, as ``tables/mlsae_layers.csv``).
It also prints each probed layer's spectrum: how many principal components hold 70% / 90% of
the variance, the share of the largest dimension and the token norms, raw and standardised.
Results go to ``--out`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import torch
from host import host

from saeflow.mlsae.math import layer_fvu, reconstruct, standardise
from saeflow.mlsae.trainer import MLSAETrainConfig, load_mlsae, train_mlsae

D = 576  # SmolLM2-135M


def layer_paths(root: Path, corpus: str, layers: list[int]) -> list[str]:
    return [str(root / corpus / f"blocks.{layer}.hook_resid_post.h5") for layer in layers]


def spectrum(path: str, n: int) -> dict[str, object]:
    """PCs for 70% / 90% of the variance, top-dimension share and norms, raw and standardised."""
    with h5py.File(path) as f:
        x = torch.from_numpy(f["acts"][:n]).double()  # type: ignore[index]
    out: dict[str, object] = {"norm_q50": float(x.norm(dim=1).median()),
                              "norm_max": float(x.norm(dim=1).max())}
    for name, v in (("raw", x), ("std", standardise(x.float()).x.double())):
        centred = v - v.mean(0)
        eig = torch.linalg.eigvalsh(centred.T @ centred).flip(0)
        share = eig.cumsum(0) / eig.sum()
        var = centred.pow(2).sum(0)
        out[f"{name}_pcs_70"] = int((share < 0.7).sum()) + 1
        out[f"{name}_pcs_90"] = int((share < 0.9).sum()) + 1
        out[f"{name}_top_dim_share"] = round(float(var.max() / var.sum()), 3)
    return out


def run(root: Path, layers: list[int], ef: int, k: int, tokens: int, lr: float,
        work: Path) -> dict[str, object]:
    cfg = MLSAETrainConfig(d_in=D, d_sae=ef * D, k=k, layers=layers, total_tokens=tokens,
                           batch_size=256, lr=lr, lr_warmup_steps=20, k_aux=256,
                           dead_tokens_threshold=200_000, standardise=True, seed=0,
                           buffer_tokens=8192, checkpoint_every_steps=100_000)
    out = work / f"x{ef}-k{k}"
    start = time.perf_counter()
    train_mlsae(layer_paths(root, "news_mlsae", layers), str(out), cfg, str(work / "ckpt"))
    train_s = time.perf_counter() - start
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    sae = load_mlsae(out)
    xs = []
    for path in layer_paths(root, "news_mlsae_eval", layers):
        with h5py.File(path) as f:
            xs.append(torch.from_numpy(f["acts"][:]))  # type: ignore[index]
    x = torch.stack(xs).float()
    with torch.inference_mode():
        recon, _ = reconstruct(sae.params, x, sae.k)
    fvu = layer_fvu(x, recon)
    return {"expansion_factor": ef, "k": k, "tokens": tokens, "lr": lr,
            "train_s": round(train_s, 1), "mean_fvu": round(float(fvu.mean()), 3),
            "max_fvu": round(float(fvu.max()), 3), "argmax_layer": layers[int(fvu.argmax())],
            "layers_below_0.3": int((fvu < 0.3).sum()),
            "fvu": [round(float(v), 3) for v in fvu]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="results/mlsae/acts/smollm2", help="the MLSAE caches")
    p.add_argument("--runs", nargs="+", default=["2x32", "4x64", "8x64", "4x128"],
                   help="R x k of each MLSAE")
    p.add_argument("--tokens", type=int, default=98_304, help="training tokens (the default's)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr (the default's)")
    p.add_argument("--spectrum-layers", type=int, nargs="*", default=[5, 15, 23, 28, 29])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/mlsae_fvu_scan_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root, layers = Path(args.acts), list(range(30))
    load = os.getloadavg()
    spectra = {layer: spectrum(layer_paths(root, "news_mlsae", [layer])[0], 20_000)
               for layer in args.spectrum_layers}
    print(json.dumps(spectra), flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            ef, k = (int(v) for v in spec.split("x"))
            runs.append(run(root, layers, ef, k, args.tokens, args.lr, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    result = {"benchmark": "MLSAE held-out FVU per layer on the default's caches",
              "command": " ".join(["python", *sys.argv]),
              "machine": {**host(), "torch": torch.__version__, "torch_threads": args.threads},
              "load_average_start": [round(v, 2) for v in load],
              "load_average_end": [round(v, 2) for v in os.getloadavg()],
              "spectra_train_layers": spectra, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
