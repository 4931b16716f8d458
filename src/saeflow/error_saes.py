"""Stage: SAEs trained on the linear or the nonlinear component of a base SAE's error (Figure 8).

``python -m saeflow.error_saes fit --acts A.h5 --base-sae saes/B --out F.h5 [--chunk-tokens N]``
``python -m saeflow.error_saes train --acts A.h5 --base-sae saes/B --fit F.h5
--component linear|nonlinear --out saes/E --checkpoint-dir DIR --d-sae M --k K --tokens T
--batch-size B --seed S [--lr F] [--lr-warmup-steps N] [--checkpoint-every N]``

The decomposition is the Dark Matter paper's (Section 4; reference A3/A4), with SaeError(x) =
x - Sae(x) for the base SAE and an affine map fitted by least squares::

    linear(x)    = x @ W + b                    ≈ SaeError(x)     W [d, d], b [d]
    nonlinear(x) = SaeError(x) - linear(x)

so linear + nonlinear = SaeError exactly (up to float rounding). The original
(``train_on_error.py``) maps ``x @ (-probe)`` and ``x - sae(x) + x @ probe`` with a probe fitted
through the origin on the tokens it then trains on; here the map has a bias column and the same
orientation for both parts.

Which tokens. ``fit`` fits the map on the SAE training corpus (the same tokens the error SAEs then
train on, as the original did) in one streaming pass of float64 normal equations
(:class:`saeflow.dark_matter.regression.NormalEquations`), with SaeError computed from the base
SAE chunk by chunk. Latent examples and scoring use the held-out evaluation corpus, so nothing
downstream is measured on the tokens the map or the error SAEs were fitted to.
``fit.h5`` has ``weight`` float64 [d, d] and ``bias`` float64 [d], the layout of
:mod:`saeflow.dark_matter.error_split`'s fit (which is made on the evaluation corpus, by design).

``train`` trains a TopK SAE (:mod:`saeflow.topk`) whose batches are computed on the fly from the
cached activations: each activation batch goes through the base SAE and the map, and only the
chosen component reaches the trainer. Components are never written to disk. The result is an
ordinary SAELens folder; its cfg.json metadata records ``saeflow_error_sae`` = {base SAE, its
path, component, fit file}. Checkpoints resume as those of ``saeflow.train`` do.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

import h5py
import torch
from safetensors.torch import save_file
from torch import Tensor

from saeflow import h5io, topk
from saeflow.batches import ActivationBatches
from saeflow.dark_matter.regression import F64, LinearFit, NormalEquations
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.saes import load_sae

COMPONENTS = ("linear", "nonlinear")
Component = Literal["linear", "nonlinear"]


# ====================================================================== pure math
def sae_error(sae: Any, x: Tensor) -> Tensor:
    """SaeError = x - Sae(x) [n, d] float32, for any SAELens SAE (encode, then decode)."""
    with torch.no_grad():
        return x - sae.decode(sae.encode(x))


def split_error(x: Tensor, error: Tensor, fit: LinearFit) -> tuple[Tensor, Tensor]:
    """(linear [n, d], nonlinear [n, d]) in float64: linear = x @ W + b, nonlinear = error - linear.

    x, error [n, d] in any float dtype; the sum of the two parts is ``error`` in float64.
    """
    linear = torch.addmm(fit.bias, x.to(F64), fit.weight)
    return linear, error.to(F64) - linear


def component_of(x: Tensor, error: Tensor, fit: LinearFit, component: Component) -> Tensor:
    """One component [n, d], computed in float64 and returned in float32 (the trainer's dtype)."""
    linear, nonlinear = split_error(x, error, fit)
    return (linear if component == "linear" else nonlinear).float()


# ====================================================================== files
def read_fit(path: str | Path, d: int | None = None) -> LinearFit:
    """The affine map of a fit file (``weight`` [d, d], ``bias`` [d], float64)."""
    shape = (d, d) if d is not None else (None, None)
    with h5io.open_checked(path, {"weight": shape, "bias": (shape[1],)}) as h5:
        weight, bias = torch.from_numpy(h5["weight"][:]), torch.from_numpy(h5["bias"][:])
        solver = h5io.plain(h5.attrs.get("solver", ""))
    if weight.shape[0] != weight.shape[1]:
        raise h5io.InputFileError(f"{path}: dataset 'weight' has shape {tuple(weight.shape)}, "
                                  "expected a square [d, d] map")
    return LinearFit(weight.to(F64), bias.to(F64), str(solver))


def _check_width(sae: Any, d: int, sae_path: str | Path, acts_path: str | Path) -> None:
    if int(sae.cfg.d_in) != d:
        raise h5io.InputFileError(f"{sae_path}: the SAE has d_in {sae.cfg.d_in}, but {acts_path} "
                                  f"has activations of width {d}")


def fit_map(acts_path: str, sae_path: str, out: str, chunk: int) -> dict[str, Any]:
    """Fit SaeError ≈ x @ W + b over every row of ``acts_path``; write ``out``; return stats."""
    sae = load_sae(sae_path)
    with h5io.open_checked(acts_path, {"acts": (None, None)}) as acts:
        n, d = acts["acts"].shape
        _check_width(sae, d, sae_path, acts_path)
        normal = NormalEquations(d, d)
        for start in range(0, n, chunk):
            x = torch.from_numpy(acts["acts"][start:start + chunk])
            normal.update(x, sae_error(sae, x))
    fit = normal.solve()
    r2 = normal.r2(fit)
    stats = {"acts_file": str(acts_path), "base_sae": str(sae_path), "n_rows": n,
             "solver": fit.solver, "r2_in_sample_pooled": r2.pooled, "r2_in_sample_mean": r2.mean}
    with h5io.atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        h5["weight"], h5["bias"] = fit.weight.numpy(), fit.bias.numpy()
        h5io.write_attrs(h5, {**stats, "convention": "SaeError = x - Sae(x) ~ x @ weight + bias"})
        h5io.mark_complete(h5)
    return stats


# ====================================================================== training
class ComponentBatches:
    """:class:`ActivationBatches` whose batches are replaced by one error component of the base SAE.

    Same stream position, state and resumption as the wrapped stream, so checkpoints of
    :mod:`saeflow.topk` work unchanged; memory is one activation buffer plus one batch.
    """

    def __init__(self, batches: ActivationBatches, sae: Any, fit: LinearFit,
                 component: Component, device: str = "cpu") -> None:
        self.batches, self.device = batches, device
        self.component: Component = component
        self.sae = sae.to(device)
        self.fit = LinearFit(fit.weight.to(device), fit.bias.to(device), fit.solver)
        self.d = batches.d

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Tensor:
        x = next(self.batches).to(self.device)  # [B, d]
        return component_of(x, sae_error(self.sae, x), self.fit, self.component)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


class ErrorSAE(NamedTuple):
    """What makes an error SAE besides its training hyper-parameters (goes into cfg.json)."""

    base_sae: str  # path of the base SAE folder
    base_sae_id: str
    component: Component
    fit: str  # path of the fit file


def train_error_sae(acts_path: str, out_dir: str, cfg: topk.TopKTrainConfig, source: ErrorSAE,
                    checkpoint_dir: str, progress: bool = False,
                    stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) a TopK SAE on one component; write ``out_dir`` when it is done.

    The loop is :mod:`saeflow.topk`'s (same init, checkpoints and logs); only the batches differ,
    so a resumed run gives the same weights as an uninterrupted one. ``stop_after_steps`` ends
    the session early after a checkpoint (tests, time-limited jobs); ``out_dir`` is not written.
    """
    sae = load_sae(source.base_sae)
    ckpt = Path(checkpoint_dir) / topk.CHECKPOINT_FILE
    out = Path(out_dir)
    batch_kw = {} if cfg.buffer_tokens is None else {"buffer_tokens": cfg.buffer_tokens}
    with ActivationBatches(acts_path, cfg.batch_size, cfg.seed, **batch_kw) as raw:
        _check_width(sae, raw.d, source.base_sae, acts_path)
        fit = read_fit(source.fit, raw.d)
        batches = ComponentBatches(raw, sae, fit, source.component, cfg.device)
        state = topk._resume(ckpt, cfg, batches)  # type: ignore[arg-type]
        first = None
        if state is None:
            first = next(batches)
            state = topk.init_state(cfg, topk.geometric_median(first))
        log = topk._CsvLog(out.with_name(out.name + ".train_log.csv"), state.step)
        stats = topk._run(state, batches, first, cfg, ckpt, log, progress,  # type: ignore[arg-type]
                          stop_after_steps)
    if state.step < cfg.total_steps:
        return stats
    save_error_sae(out, state.params, cfg, stats, source)
    return stats


def save_error_sae(out_dir: Path, params: topk.TopKParams, cfg: topk.TopKTrainConfig,
                   stats: dict[str, Any], source: ErrorSAE) -> None:
    """SAELens folder as :func:`saeflow.topk.save_topk`, plus ``metadata.saeflow_error_sae``."""
    config = topk.sae_lens_config(cfg, stats)
    config["metadata"]["saeflow_error_sae"] = source._asdict()
    weights = {name: getattr(params, name).detach().float().cpu().contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with h5io.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / "sae_weights.safetensors")
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (tmp / "cfg.json").write_text(text + "\n")


# ====================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.error_saes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit SaeError ~ x @ W + b on an activations file")
    train = sub.add_parser("train", help="train a TopK SAE on one error component")
    for q in (fit, train):
        q.add_argument("--acts", required=True, help="activations file at the base SAE's site")
        q.add_argument("--base-sae", required=True, help="base SAE folder (SAELens layout)")
        q.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    fit.add_argument("--out", required=True, help="fit file (.h5)")
    fit.add_argument("--chunk-tokens", type=int, default=4096, help="rows per streamed chunk")
    train.add_argument("--fit", required=True, help="fit file written by 'fit'")
    train.add_argument("--component", required=True, choices=COMPONENTS)
    train.add_argument("--base-sae-id", default="", help="base SAE id, recorded in cfg.json")
    train.add_argument("--out", required=True, help="output SAE folder")
    train.add_argument("--checkpoint-dir", required=True)
    train.add_argument("--d-sae", type=int, required=True, help="latents")
    train.add_argument("--k", type=int, required=True, help="active latents per token")
    train.add_argument("--tokens", type=int, required=True, help="training tokens")
    train.add_argument("--batch-size", type=int, required=True, help="tokens per step")
    train.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    train.add_argument("--lr", type=float, help="Adam learning rate (default: topk's)")
    train.add_argument("--lr-warmup-steps", type=int, help="linear warm-up steps")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    train.add_argument("--hook-name", help="site, recorded in cfg.json")
    train.add_argument("--model-name", help="model, recorded in cfg.json")
    train.add_argument("--dataset", help="corpus, recorded in cfg.json")
    train.add_argument("--device", default="cpu", help=DEVICE_HELP)
    return p


def _train_config(args: argparse.Namespace, d_in: int) -> topk.TopKTrainConfig:
    optional = {"lr": args.lr, "lr_warmup_steps": args.lr_warmup_steps,
                "checkpoint_every_steps": args.checkpoint_every}
    return topk.TopKTrainConfig(
        d_in=d_in, d_sae=args.d_sae, k=args.k, total_tokens=args.tokens,
        batch_size=args.batch_size, seed=args.seed, hook_name=args.hook_name,
        model_name=args.model_name, dataset=args.dataset, device=resolve_device(args.device),
        **{key: value for key, value in optional.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "fit":
        if args.chunk_tokens < 1:
            raise SystemExit(f"--chunk-tokens must be >= 1, got {args.chunk_tokens}")
        result = fit_map(args.acts, args.base_sae, args.out, args.chunk_tokens)
    else:
        with h5io.open_checked(args.acts, {"acts": (None, None)}) as h5:
            d_in = int(h5["acts"].shape[1])
        cfg = _train_config(args, d_in)
        source = ErrorSAE(str(args.base_sae), args.base_sae_id, args.component, str(args.fit))
        result = train_error_sae(args.acts, args.out, cfg, source, args.checkpoint_dir)
        result = {**result, "train_config": asdict(cfg)}
    print(json.dumps(result, sort_keys=True, default=str))
    return result


if __name__ == "__main__":
    main()
