"""Stage module: train one SAE on a cached activations file.

    python -m saeflow.train --acts acts/{model}/{corpus}/{site}.h5 --out saes/{sae_id} \\
        --architecture {topk,batchtopk,standard,jumprelu,gated,saex} --d-sae N \\
        [--k N | --l1-coefficient F | --l0-coefficient F | --sparsity-coefficient F] [--lr F] \\
        --batch-size N --tokens N --seed S --checkpoint-dir DIR [options]

topk goes to saeflow.topk (sparse-decoder TopK trainer); the other architectures go to
saeflow.sae_lens_train (SAELens's training classes); saex goes to saeflow.saex_train (a ReLU
SAE with saex's techniques, saved as a SAELens standard SAE). Argument combinations and the activations
file are checked before any work starts. The output folder is in the SAELens layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import h5py
import torch

from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.h5io import InputFileError, open_checked
from saeflow.saex_train import SaexTrainConfig, train_saex
from saeflow.topk import TopKTrainConfig, train_topk

if TYPE_CHECKING:  # imported where used: sae_lens takes ~6 s to import, topk and saex need none
    from saeflow.sae_lens_train import SAELensTrainConfig

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu", "gated", "saex")
SAE_LENS = ("batchtopk", "standard", "jumprelu", "gated")
# The sparsity argument each architecture requires.
REQUIRED = {
    "topk": "k",
    "batchtopk": "k",
    "standard": "l1_coefficient",
    "gated": "l1_coefficient",
    "jumprelu": "l0_coefficient",
    "saex": "sparsity_coefficient",
}
# saex's techniques (saeflow.saex_train.SaexTrainConfig fields; each documents its source).
SAEX_OPTIONS: dict[str, Any] = {
    "sparsity_loss": ("l1", "l1_sqrt", "tanh", "hoyer", "recip"),
    "recip_eps": float,
    "recip_anneal_steps": int,
    "tanh_stretch": float,
    "decoder_norm_weighted": bool,
    "per_latent_scale": bool,
    "restrict_dec_norm": ("exact", "lte", "none"),
    "project_decoder": ("none", "grads", "updates"),
    "ghost_grads": bool,
    "dead_after_steps": int,
    "input_norm": ("none", "wes", "wes-mean"),
    "encoder_init": ("kaiming", "orthogonal"),
    "decoder_init": ("tied", "orthogonal", "pseudoinverse"),
    "b_dec_init": ("zeros", "mean", "geom_median"),
    "gated": bool,
    "adam_beta1": float,
    "adam_beta2": float,
    "clip_grad_norm": float,
}
# Llama Scope's recipe (saeflow.topk.TopKTrainConfig fields; each documents its source).
LLAMASCOPE_OPTIONS: dict[str, Any] = {
    "decoder_norm_topk": bool,
    "decoder_init_norm": float,
    "activation_norm": ("none", "dataset_wise"),
    "initial_k": int,
    "k_warmup_steps": int,
    "k_schedule": ("linear", "exponential"),
    "k_exponential_factor": float,
    "lr_cooldown_steps": int,
    "lr_end_ratio": float,
    "save_as": ("topk", "jumprelu"),
    "selection_dtype": ("float32", "bfloat16"),  # saeflow's, not Llama Scope's
}
# Optional arguments that apply only to some architectures (dest -> architectures).
ONLY_FOR: dict[str, tuple[str, ...]] = {
    "k": ("topk", "batchtopk"),
    "l1_coefficient": ("standard", "gated"),
    "l0_coefficient": ("jumprelu",),
    "auxk_coef": ("topk",),
    "k_aux": ("topk",),
    "dead_tokens_threshold": ("topk",),
    "aux_loss_coefficient": ("batchtopk",),
    "topk_threshold_lr": ("batchtopk",),
    "l1_warm_up_steps": ("standard", "gated"),
    "l0_warm_up_steps": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
    "jumprelu_bandwidth": ("jumprelu",),
    "jumprelu_sparsity_loss_mode": ("jumprelu",),
    "pre_act_loss_coefficient": ("jumprelu",),
    "sparsity_coefficient": ("saex",),
    **{name: ("saex",) for name in SAEX_OPTIONS},
    **{name: ("topk",) for name in LLAMASCOPE_OPTIONS},
    **{name: ("saex", "topk") for name in ("adam_beta1", "adam_beta2", "clip_grad_norm")},
    "lr_decay_steps": SAE_LENS,
    "normalize_activations": SAE_LENS,
    "dead_feature_window": SAE_LENS,
}
# SAELens training-config fields passed through as sae_options.
SAE_OPTIONS = (
    "aux_loss_coefficient",
    "topk_threshold_lr",
    "jumprelu_init_threshold",
    "jumprelu_bandwidth",
    "jumprelu_sparsity_loss_mode",
    "pre_act_loss_coefficient",
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text}")


def _add_saex_arguments(p: argparse.ArgumentParser) -> None:
    saex = p.add_argument_group("saex (saeflow.saex_train: ReLU SAE with saex's techniques)")
    saex.add_argument("--sparsity-coefficient", type=_nonnegative_float, help="penalty weight")
    for name, kind in SAEX_OPTIONS.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(kind, tuple):
            saex.add_argument(flag, choices=kind)
        else:
            saex.add_argument(flag, type=_boolean if kind is bool else kind)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m saeflow.train", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument(
        "--acts", required=True, help="activations file (acts/{model}/{corpus}/{site}.h5)"
    )
    p.add_argument("--out", required=True, help="output SAE folder (SAELens layout)")
    p.add_argument("--architecture", required=True, choices=ARCHITECTURES)
    width = p.add_mutually_exclusive_group(required=True)
    width.add_argument("--d-sae", type=_positive_int, help="number of latents")
    width.add_argument(
        "--expansion-factor", type=_positive_float, help="latents as a multiple of d_in"
    )
    p.add_argument(
        "--k", type=_positive_float, help="topk: latents per token; batchtopk: mean per token"
    )
    p.add_argument(
        "--l1-coefficient", type=_nonnegative_float, help="standard, gated: L1 penalty weight"
    )
    p.add_argument("--l0-coefficient", type=_nonnegative_float, help="jumprelu: L0 penalty weight")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the trainer's)")
    p.add_argument("--lr-warmup-steps", type=_nonnegative_int, help="linear LR warm-up steps")
    p.add_argument("--batch-size", required=True, type=_positive_int, help="tokens per step")
    p.add_argument("--tokens", required=True, type=_positive_int, help="training tokens")
    p.add_argument("--seed", required=True, type=int, help="weights and data-order seed")
    p.add_argument("--checkpoint-dir", required=True, help="resumable checkpoints go here")
    p.add_argument(
        "--checkpoint-every-steps",
        "--checkpoint-every",
        type=_positive_int,
        help="steps between checkpoints",
    )
    p.add_argument("--hook-name", help="model site (default: the acts file's 'site')")
    p.add_argument("--model-name", help="model (default: the acts file's 'model')")
    p.add_argument("--dataset", help="corpus (default: the acts file's 'corpus')")
    p.add_argument("--buffer-tokens", type=_positive_int, help="shuffle buffer of the batch stream")
    p.add_argument("--log-every-steps", type=_positive_int, help="CSV log interval")
    p.add_argument(
        "--train-log",
        help="where the CSV training log goes (the rules: logs/train_sae/{sae_id}.train_log.csv; "
        "default: the trainer's own place)",
    )
    p.add_argument("--device", help=f"{DEVICE_HELP} (default: cpu)")
    p.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads (pass the rule's {threads})"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    topk = p.add_argument_group("topk only")
    topk.add_argument("--auxk-coef", type=float, help="AuxK loss weight")
    topk.add_argument("--k-aux", type=_positive_int, help="dead latents used by the AuxK loss")
    topk.add_argument(
        "--dead-tokens-threshold", type=_positive_int, help="tokens before a latent is dead"
    )
    for name, kind in LLAMASCOPE_OPTIONS.items():  # Llama Scope's recipe
        flag = f"--{name.replace('_', '-')}"
        if isinstance(kind, tuple):
            topk.add_argument(flag, choices=kind)
        else:
            topk.add_argument(flag, type=_boolean if kind is bool else kind)
    sl = p.add_argument_group("SAELens architectures (batchtopk, standard, jumprelu, gated)")
    sl.add_argument(
        "--lr-decay-steps", type=_nonnegative_int, help="linear LR decay over the last steps"
    )
    sl.add_argument("--normalize-activations", choices=("none", "expected_average_only_in"))
    sl.add_argument(
        "--dead-feature-window", type=_positive_int, help="steps before a latent is dead"
    )
    sl.add_argument("--aux-loss-coefficient", type=float, help="batchtopk: AuxK loss weight")
    sl.add_argument(
        "--topk-threshold-lr", type=_positive_float, help="batchtopk: threshold EMA rate"
    )
    sl.add_argument("--l1-warm-up-steps", type=_nonnegative_int, help="standard, gated: L1 warm-up")
    sl.add_argument("--l0-warm-up-steps", type=_nonnegative_int, help="jumprelu: L0 warm-up")
    sl.add_argument("--jumprelu-init-threshold", type=_positive_float)
    sl.add_argument("--jumprelu-bandwidth", type=_positive_float)
    sl.add_argument("--jumprelu-sparsity-loss-mode", choices=("step", "tanh"))
    sl.add_argument("--pre-act-loss-coefficient", type=float)
    _add_saex_arguments(p)
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject argument combinations that do not fit the architecture (exits with usage error)."""
    arch = args.architecture
    required = REQUIRED[arch]
    if getattr(args, required) is None:
        parser.error(f"--architecture {arch} requires --{required.replace('_', '-')}")
    for dest, archs in ONLY_FOR.items():
        if getattr(args, dest) is not None and arch not in archs:
            parser.error(
                f"--{dest.replace('_', '-')} does not apply to --architecture {arch} "
                f"(only to {', '.join(archs)})"
            )
    if arch == "topk" and not float(args.k).is_integer():
        parser.error(f"--k must be a whole number for --architecture topk, got {args.k}")
    if args.tokens < args.batch_size:
        parser.error(f"--tokens ({args.tokens}) must be at least --batch-size ({args.batch_size})")


def read_acts_info(path: str, batch_size: int) -> dict[str, Any]:
    """d_in, token count and provenance attributes of a checked activations file."""
    with open_checked(path, {"acts": (None, None)}) as h5:
        acts = h5["acts"]
        assert isinstance(acts, h5py.Dataset)  # open_checked checked its shape
        n_tokens, d_in = acts.shape
        attrs = {key: _text(h5.attrs.get(key)) for key in ("site", "model", "corpus")}
    if n_tokens < batch_size:
        raise InputFileError(
            f"{path}: dataset 'acts' has {n_tokens} tokens, fewer than --batch-size {batch_size}"
        )
    return {"d_in": int(d_in), "n_tokens": int(n_tokens), **attrs}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def topk_config(args: argparse.Namespace, info: dict[str, Any]) -> TopKTrainConfig:
    return TopKTrainConfig(
        d_in=info["d_in"],
        d_sae=info["d_sae"],
        k=int(args.k),
        batch_size=args.batch_size,
        total_tokens=args.tokens,
        seed=args.seed,
        hook_name=args.hook_name,
        model_name=args.model_name,
        dataset=args.dataset,
        **_given(
            args,
            "lr",
            "auxk_coef",
            "k_aux",
            "dead_tokens_threshold",
            *LLAMASCOPE_OPTIONS,
            "adam_beta1",
            "adam_beta2",
            "clip_grad_norm",
            "lr_warmup_steps",
            "checkpoint_every_steps",
            "log_every_steps",
            "buffer_tokens",
            "device",
        ),
    )


def saex_config(args: argparse.Namespace, info: dict[str, Any]) -> SaexTrainConfig:
    return SaexTrainConfig(
        d_in=info["d_in"],
        d_sae=info["d_sae"],
        total_tokens=args.tokens,
        sparsity_coefficient=args.sparsity_coefficient,
        batch_size=args.batch_size,
        seed=args.seed,
        hook_name=args.hook_name,
        model_name=args.model_name,
        dataset=args.dataset,
        **_given(
            args,
            *SAEX_OPTIONS,
            "lr",
            "lr_warmup_steps",
            "checkpoint_every_steps",
            "log_every_steps",
            "buffer_tokens",
            "device",
        ),
    )


def sae_lens_config(args: argparse.Namespace, info: dict[str, Any]) -> SAELensTrainConfig:
    from saeflow.sae_lens_train import SAELensTrainConfig

    warmup = args.l1_warm_up_steps if args.l1_warm_up_steps is not None else args.l0_warm_up_steps
    return SAELensTrainConfig(
        architecture=args.architecture,
        d_in=info["d_in"],
        d_sae=info["d_sae"],
        batch_size=args.batch_size,
        total_tokens=args.tokens,
        seed=args.seed,
        k=args.k,
        l1_coefficient=args.l1_coefficient,
        l0_coefficient=args.l0_coefficient,
        sae_options=_given(args, *SAE_OPTIONS),
        hook_name=args.hook_name,
        model_name=args.model_name,
        dataset=args.dataset,
        **({"sparsity_warmup_steps": warmup} if warmup is not None else {}),
        **_given(
            args,
            "lr",
            "lr_warmup_steps",
            "lr_decay_steps",
            "normalize_activations",
            "dead_feature_window",
            "checkpoint_every_steps",
            "log_every_steps",
            "buffer_tokens",
            "device",
        ),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    if args.device is not None:
        args.device = resolve_device(args.device)
    try:
        info = read_acts_info(args.acts, args.batch_size)
    except InputFileError as err:
        sys.exit(f"saeflow.train: error: --acts {err}")
    info["d_sae"] = args.d_sae or args.expansion_factor * info["d_in"]
    if not float(info["d_sae"]).is_integer():
        sys.exit(
            f"saeflow.train: error: --expansion-factor {args.expansion_factor} times d_in "
            f"{info['d_in']} of {args.acts} is not a whole number of latents"
        )
    info["d_sae"] = int(info["d_sae"])
    args.hook_name = args.hook_name or info["site"]
    args.model_name = args.model_name or info["model"]
    args.dataset = args.dataset or info["corpus"]
    if args.threads is not None:
        # Torch defaults to one thread per core; beside other jobs that oversubscribes the CPU.
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if args.architecture == "topk":
        summary = train_topk(
            args.acts, args.out, topk_config(args, info), args.checkpoint_dir, progress=progress,
            log_path=args.train_log,
        )  # fmt: skip
    elif args.architecture == "saex":
        summary = train_saex(
            args.acts, args.out, saex_config(args, info), args.checkpoint_dir, progress=progress,
            log_path=args.train_log,
        )  # fmt: skip
    else:
        from saeflow.sae_lens_train import train_sae_lens

        cfg = sae_lens_config(args, info)
        summary = train_sae_lens(
            args.acts, args.out, cfg, args.checkpoint_dir, progress=progress,
            log_path=args.train_log,
        )  # fmt: skip
    print(json.dumps(summary, sort_keys=True, default=str))
    return summary


if __name__ == "__main__":
    main()
