"""Stage: train one MLSAE on cached per-layer activations.

``python -m saeflow.mlsae.train --acts L0.h5 L1.h5 ... --layers 0 1 ... --out DIR
--checkpoint-dir CK --expansion-factor R --k K --tokens N``

Writes ``DIR`` in both layouts (:mod:`saeflow.mlsae.trainer`) and ``DIR.train_log.csv``.
The tuned-lens variant of the original (``--tuned_lens``) is not implemented: no tuned lens for
the supported models is available offline.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import h5py
import torch

from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.h5io import InputFileError
from saeflow.mlsae.trainer import MLSAETrainConfig, default_lr, train_mlsae


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.mlsae.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", nargs="+", required=True, help="one activations file per layer")
    p.add_argument("--layers", nargs="+", type=int, required=True, help="their layer indices")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint-dir", required=True, help="resumable checkpoints")
    p.add_argument("--expansion-factor", type=int, required=True, help="latents / d_model")
    p.add_argument("--k", type=int, required=True, help="active latents per (layer, token)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: width-scaled)")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--k-aux", type=int, default=256, help="AuxK latents")
    p.add_argument("--dead-tokens", type=int, default=10_000_000, help="dead after N tokens")
    p.add_argument("--no-standardise", action="store_true", help="skip standardisation")
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    p.add_argument("--buffer-tokens", type=int, default=8192, help="shuffle buffer per layer")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps per checkpoint")
    p.add_argument("--model-name", default=None, help="recorded in cfg.json")
    p.add_argument("--dataset", default=None, help="recorded in cfg.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if len(args.acts) != len(args.layers):
        raise SystemExit(f"--acts gives {len(args.acts)} files for {len(args.layers)} --layers")
    if args.threads:
        torch.set_num_threads(args.threads)
    with h5py.File(args.acts[0], "r") as h5:
        if "acts" not in h5 or h5["acts"].ndim != 2:  # type: ignore[union-attr]
            raise InputFileError(f"{args.acts[0]}: no 2-D dataset 'acts'")
        d = int(h5["acts"].shape[1])  # type: ignore[union-attr]
    d_sae = args.expansion_factor * d
    cfg = MLSAETrainConfig(
        d_in=d, d_sae=d_sae, k=args.k, layers=args.layers, total_tokens=args.tokens,
        batch_size=args.batch_size, lr=args.lr or default_lr(d_sae),
        lr_warmup_steps=args.lr_warmup_steps, k_aux=args.k_aux,
        dead_tokens_threshold=args.dead_tokens, standardise=not args.no_standardise,
        seed=args.seed, buffer_tokens=args.buffer_tokens,
        checkpoint_every_steps=args.checkpoint_every, model_name=args.model_name,
        dataset=args.dataset, device=str(resolve_device(args.device)))
    stats = train_mlsae(args.acts, args.out, cfg, args.checkpoint_dir)
    print(stats)
    return stats


if __name__ == "__main__":
    main()
