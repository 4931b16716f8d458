"""Stage: train one MLSAE on cached per-layer activations, or on activations computed on the fly.

``python -m saeflow.mlsae.train --acts L0.h5 L1.h5 ... --layers 0 1 ... --out DIR
--checkpoint-dir CK --expansion-factor R --k K --tokens N``

With ``--model DIR --tokens-file T.h5`` instead of ``--acts``, each batch comes from the model
run on the tokens as training goes (:mod:`saeflow.mlsae.stream`); nothing is cached.

Writes ``DIR`` in both layouts (:mod:`saeflow.mlsae.trainer`) and ``DIR.train_log.csv``.
The tuned-lens variant of the original (``--tuned_lens``) is not implemented: no tuned lens for
the supported models is available offline.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import h5py
import torch

from saeflow import h5io
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.h5io import InputFileError
from saeflow.mlsae.stream import ModelLayerBatches
from saeflow.mlsae.trainer import MLSAETrainConfig, default_lr, train_mlsae
from saeflow.models import load_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.mlsae.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--acts", nargs="+", help="one activations file per layer")
    source.add_argument("--model", help="model folder or id: compute activations on the fly")
    p.add_argument("--tokens-file", help="with --model: the training tokens file")
    p.add_argument("--skip-positions", type=int, default=1, help="with --model: leading positions left out")
    p.add_argument("--seqs-per-pass", type=int, default=32, help="with --model: sequences per forward")
    p.add_argument("--dtype", default="float32", help="with --model: the model's dtype")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    if args.acts:
        if len(args.acts) != len(args.layers):
            raise SystemExit(f"--acts gives {len(args.acts)} files for {len(args.layers)} --layers")
        with h5py.File(args.acts[0], "r") as h5:
            if "acts" not in h5 or h5["acts"].ndim != 2:  # type: ignore[union-attr]
                raise InputFileError(f"{args.acts[0]}: no 2-D dataset 'acts'")
            d = int(h5["acts"].shape[1])  # type: ignore[union-attr]
        source: list[str] | ModelLayerBatches = args.acts
    else:
        if not args.tokens_file:
            raise SystemExit("--model needs --tokens-file (the training tokens)")
        model, _ = load_model(args.model, dtype=args.dtype, device=device)
        with h5io.open_checked(args.tokens_file, datasets={"tokens": (None, None)}) as f:
            tokens = f["tokens"][:]  # type: ignore[index]
        d = int(model.config.hidden_size)
        source = ModelLayerBatches(model, tokens, args.layers, args.batch_size, args.seed,
                                   args.seqs_per_pass, args.skip_positions)
    d_sae = args.expansion_factor * d
    cfg = MLSAETrainConfig(
        d_in=d, d_sae=d_sae, k=args.k, layers=args.layers, total_tokens=args.tokens,
        batch_size=args.batch_size, lr=args.lr or default_lr(d_sae),
        lr_warmup_steps=args.lr_warmup_steps, k_aux=args.k_aux,
        dead_tokens_threshold=args.dead_tokens, standardise=not args.no_standardise,
        seed=args.seed, buffer_tokens=args.buffer_tokens,
        checkpoint_every_steps=args.checkpoint_every, model_name=args.model_name,
        dataset=args.dataset, device=device)
    stats = train_mlsae(source, args.out, cfg, args.checkpoint_dir)
    print(stats)
    return stats


if __name__ == "__main__":
    main()
