"""Training an MLSAE: configuration, state, one step, the resumable loop, and the two layouts.

Data: one cached activations file per layer (``acts`` [n_tokens, d], the same tokens in the same
rows, as :mod:`saeflow.activations` writes them in one pass). One :class:`ActivationBatches` per
layer with the same seed and chunking serves the same rows in the same order (its permutation is
a pure function of seed, epoch and buffer index), so a step's batch is ``[n_layers, B, d]``.

Files written to ``out_dir``:

- ``cfg.json`` + ``sae_weights.safetensors``: SAELens 6 ``TopKSAE`` with
  ``normalize_activations: layer_norm`` (SAELens's per-token standardisation), ``b_enc = 0`` and
  ``b_dec`` the pre-encoder bias, so ``sae_lens.SAE.load_from_disk`` encodes as the MLSAE does
  at any one layer. SAELens de-standardises with ``std`` where saeflow uses ``std + 1e-5``: a
  relative difference below 1e-5 for residual streams.
- ``original/config.json`` + ``original/model.safetensors``: the original's
  ``PyTorchModelHubMixin`` layout (``encoder.weight`` [m, d], ``decoder.weight`` [d, m],
  ``pre_encoder_bias`` [d], ``last_nonzero`` [m]), as ``tim-lawson/mlsae-*`` repositories hold.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saeflow import __version__
from saeflow.batches import ActivationBatches
from saeflow.h5io import InputFileError, atomic_path
from saeflow.mlsae.math import MLSAEStep, loss_and_grads, standardise
from saeflow.topk import (
    TopKParams,
    TrainState,
    _sae_lens_version,
    geometric_median,
    init_params,
    normalize_decoder_,
    project_decoder_grad_,
)

CHECKPOINT_FILE = "mlsae_checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class MLSAETrainConfig:
    """Hyper-parameters of one MLSAE run (all of it goes into cfg.json)."""

    d_in: int
    """Residual width d_model."""
    d_sae: int
    """Number of latents (expansion factor x d_in)."""
    k: int
    """Active latents per (layer, token) row."""
    layers: list[int]
    """Layers whose ``hook_resid_post`` the MLSAE reads, in order."""
    total_tokens: int
    """Training length in model tokens (each gives one row per layer)."""
    batch_size: int = 1024
    """Model tokens per step (n_layers x batch_size rows)."""
    lr: float = 1e-4
    """Adam learning rate (the original's 1e-4, no schedule)."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (the original's)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps (the original has none)."""
    k_aux: int = 256
    """Dead latents AuxK uses per row (the original's 256)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (the original's 1/32)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has fired at no layer for more than this many tokens is dead (10M)."""
    standardise: bool = True
    """Per-row standardisation of the inputs (the original's default)."""
    seed: int = 0
    """Seeds the initialisation and the batch order."""
    buffer_tokens: int = 8192
    """Shuffle buffer per layer (n_layers buffers are held)."""
    checkpoint_every_steps: int = 100
    """Write a resumable checkpoint every this many steps."""
    log_every_steps: int = 20
    """CSV log row every this many steps."""
    model_name: str | None = None
    """Model the activations come from."""
    dataset: str | None = None
    """Corpus the activations come from."""
    device: str = "cpu"
    """Torch device for training."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k", "total_tokens", "batch_size", "k_aux"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLSAETrainConfig.{name} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.k > self.d_sae:
            raise ValueError(f"MLSAETrainConfig.k ({self.k}) exceeds d_sae ({self.d_sae})")
        if len(self.layers) < 1 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"MLSAETrainConfig.layers must be distinct and non-empty, "
                             f"got {self.layers}")

    @property
    def total_steps(self) -> int:
        return -(-self.total_tokens // self.batch_size)


def lr_at(step: int, cfg: MLSAETrainConfig) -> float:
    """Learning rate at 0-based ``step``: optional linear warm-up, then constant."""
    if cfg.lr_warmup_steps == 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)


def init_state(cfg: MLSAETrainConfig, bias: Tensor) -> TrainState:
    """Tied init (W_enc = W_dec.T, unit-norm rows, seeded), pre-encoder bias ``bias``, Adam."""
    p = init_params(cfg.d_in, cfg.d_sae, bias, cfg.seed, cfg.device)
    leaves = [p.W_enc.t(), p.b_enc, p.W_dec, p.b_dec]
    for leaf in leaves:
        leaf.grad = torch.zeros_like(leaf)
    optimizer = torch.optim.Adam(leaves, lr=lr_at(0, cfg), eps=cfg.adam_eps)
    counts = torch.zeros(cfg.d_sae, dtype=torch.int64, device=cfg.device)
    return TrainState(leaves, optimizer, 0, counts)


def prepare(x: Tensor, cfg: MLSAETrainConfig) -> Tensor:
    """The encoder's inputs from raw activations (L, B, d)."""
    return standardise(x).x if cfg.standardise else x


@torch.no_grad()
def train_step(state: TrainState, x: Tensor, cfg: MLSAETrainConfig) -> MLSAEStep:
    """One step on raw activations ``x`` (L, B, d): loss, projected gradient, Adam, renorm."""
    dead = state.tokens_since_fired > cfg.dead_tokens_threshold
    out = loss_and_grads(state.params, prepare(x, cfg), cfg.k, dead_mask=dead, k_aux=cfg.k_aux,
                         auxk_coef=cfg.auxk_coef)
    for leaf, grad in zip(state.leaves, (out.grads.W_enc.t(), out.grads.b_enc,
                                         out.grads.W_dec, out.grads.b_dec)):
        assert leaf.grad is not None
        leaf.grad.copy_(grad)
    # the original's unit_norm_decoder_gradient, then Adam, then unit_norm_decoder
    assert state.leaves[2].grad is not None
    project_decoder_grad_(state.leaves[2], state.leaves[2].grad)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    state.optimizer.step()
    normalize_decoder_(state.leaves[2])
    fired = out.codes.indices[out.codes.values > 0]
    state.tokens_since_fired.add_(x.shape[1]).index_fill_(0, fired, 0)
    state.step += 1
    return out


# ====================================================================== data
class LayerBatches:
    """The same seeded rows of every layer's activations file: yields (L, B, d) batches."""

    def __init__(self, paths: list[str], cfg: MLSAETrainConfig) -> None:
        self._stack = ExitStack()
        self.streams = [self._stack.enter_context(
            ActivationBatches(p, cfg.batch_size, cfg.seed, buffer_tokens=cfg.buffer_tokens))
            for p in paths]
        first = self.streams[0]
        for path, s in zip(paths, self.streams):
            if (s.n_tokens, s.d) != (first.n_tokens, cfg.d_in):
                raise InputFileError(f"{path}: acts is [{s.n_tokens}, {s.d}], expected "
                                     f"[{first.n_tokens}, {cfg.d_in}] like {paths[0]}")

    def __next__(self) -> Tensor:
        return torch.stack([next(s) for s in self.streams])

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self.streams]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for s, st in zip(self.streams, states):
            s.load_state_dict(st)

    def close(self) -> None:
        self._stack.close()


# ====================================================================== the loop
LOG_COLUMNS: list[str] = [
    "step", "tokens", "loss", "fvu", "auxk_loss", "l0", "dead_fraction", "tokens_per_s"
]


class Batches(Protocol):
    """A resumable source of [n_layers, B, d] batches: :class:`LayerBatches` (cached files) or
    :class:`saeflow.mlsae.stream.ModelLayerBatches` (computed on the fly)."""

    def __next__(self) -> Tensor: ...
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any, /) -> None: ...
    def close(self) -> None: ...


def train_mlsae(
    source: Sequence[str] | Batches,
    out_dir: str | os.PathLike[str],
    cfg: MLSAETrainConfig,
    checkpoint_dir: str | os.PathLike[str],
    progress: bool = True,
    *,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) an MLSAE on ``source`` (one activations file per layer, or a
    :class:`Batches`, which the call closes); write ``out_dir``.

    A checkpoint of the same configuration in ``checkpoint_dir`` is resumed; the result is then
    bitwise identical to an uninterrupted run (same machine, same thread count). The CSV log is
    ``<out_dir>.train_log.csv``. ``stop_after_steps`` ends early after checkpointing (tests).
    """
    if isinstance(source, Sequence):
        if len(source) != len(cfg.layers):
            raise ValueError(f"{len(source)} activations files for {len(cfg.layers)} layers")
        batches: Batches = LayerBatches(list(source), cfg)
    else:
        batches = source
    out_dir, ckpt = Path(out_dir), Path(checkpoint_dir) / CHECKPOINT_FILE
    log_path = out_dir.with_name(out_dir.name + ".train_log.csv")
    try:
        state, first = _resume(ckpt, cfg, batches), None
        if state is None:
            first = next(batches)
            # the original's geometric median of the first batch (of encoder inputs)
            bias = geometric_median(prepare(first, cfg).reshape(-1, cfg.d_in)).float()
            state = init_state(cfg, bias)
        rows = _log_rows(ckpt.with_suffix(".log.csv"), state.step)
        end = cfg.total_steps if stop_after_steps is None else min(cfg.total_steps,
                                                                  stop_after_steps)
        _loop(state, batches, first, cfg, ckpt, rows, end, progress)
        _write_log(log_path, rows)
    finally:
        batches.close()
    stats = {key: v for key, v in rows[-1].items() if key != "step"} if rows else {}
    stats = {**stats, "steps": state.step}
    if state.step >= cfg.total_steps:
        save_mlsae(out_dir, state.params, cfg, stats, state.tokens_since_fired)
    return stats


def _loop(state: TrainState, batches: Batches, first: Tensor | None,
          cfg: MLSAETrainConfig, ckpt: Path, rows: list[dict[str, Any]], end: int,
          progress: bool) -> None:
    sums: dict[str, float] = dict.fromkeys(("loss", "fvu", "auxk_loss", "l0"), 0.0)
    n_steps, since = 0, time.time()
    bar = tqdm(total=cfg.total_steps, initial=state.step, disable=not progress, unit="step")
    while state.step < end:
        x = (first if first is not None else next(batches)).to(cfg.device)
        first = None
        out = train_step(state, x, cfg)
        for key, value in (("loss", out.loss), ("fvu", out.layer_fvu.mean()),
                           ("auxk_loss", out.auxk_loss)):
            sums[key] += float(value)
        sums["l0"] += float((out.codes.values > 0).sum()) / out.codes.values.shape[0]
        n_steps += 1
        bar.update(1)
        at_ckpt = state.step % cfg.checkpoint_every_steps == 0
        if state.step % cfg.log_every_steps == 0 or at_ckpt or state.step == end:
            dead = float((state.tokens_since_fired > cfg.dead_tokens_threshold).float().mean())
            rate = n_steps * cfg.batch_size / max(time.time() - since, 1e-9)
            rows.append({"step": state.step, "tokens": state.step * cfg.batch_size,
                         **{k: v / n_steps for k, v in sums.items()},
                         "dead_fraction": dead, "tokens_per_s": rate})
            bar.set_postfix(fvu=f"{rows[-1]['fvu']:.4f}")
            sums, n_steps, since = dict.fromkeys(sums, 0.0), 0, time.time()
        if at_ckpt or state.step == end < cfg.total_steps:
            _write_log(ckpt.with_suffix(".log.csv"), rows)
            save_checkpoint(ckpt, state, batches, cfg)
    bar.close()


def _log_rows(path: Path, through_step: int) -> list[dict[str, Any]]:
    """Log rows of a resumed run up to its checkpoint (saved beside the checkpoint)."""
    if through_step == 0 or not path.exists():
        return []
    with path.open(newline="") as f:
        rows = [{k: int(v) if k in ("step", "tokens") else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= through_step]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _resume_key(cfg: MLSAETrainConfig, batches: Batches) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config (less what may change) and the
    kind of batch source (cached files and on-the-fly streams keep different positions)."""
    key = asdict(cfg)
    for name in ("total_tokens", "checkpoint_every_steps", "log_every_steps", "device"):
        del key[name]
    return {**key, "source": type(batches).__name__}


def save_checkpoint(path: Path, state: TrainState, batches: Batches,
                    cfg: MLSAETrainConfig) -> None:
    """Atomically write params, Adam state, step, firing counters and stream positions."""
    payload = {"format": CHECKPOINT_FORMAT, "config": _resume_key(cfg, batches),
               "state": state.state_dict(), "batches": batches.state_dict(),
               "saeflow_version": __version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume(path: Path, cfg: MLSAETrainConfig, batches: Batches) -> TrainState | None:
    if not path.exists():
        return None
    payload = torch.load(path, map_location=cfg.device, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("config") != _resume_key(cfg, batches):
        print(f"{path}: checkpoint is for a different configuration; starting afresh",
              file=sys.stderr)
        return None
    state = init_state(cfg, torch.zeros(cfg.d_in))
    state.load_state_dict(payload["state"])
    batches.load_state_dict(payload["batches"])
    print(f"{path}: resuming from the checkpoint at step {state.step}", file=sys.stderr)
    return state


# ====================================================================== files
def sae_lens_config(cfg: MLSAETrainConfig, stats: dict[str, Any] | None = None,
                    hook_name: str | None = None) -> dict[str, Any]:
    """cfg.json for SAELens 6 ``TopKSAE``; the MLSAE's own settings go in metadata."""
    return {
        "architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.standardise else "none",
        "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": _sae_lens_version(), "model_name": cfg.model_name,
            # SAELens has one hook per SAE: the first layer's; the MLSAE reads all of them
            "hook_name": hook_name or f"blocks.{cfg.layers[0]}.hook_resid_post",
            "dataset_path": cfg.dataset, "training_architecture": "mlsae",
            "saeflow_version": __version__, "saeflow_mlsae": True,
            "saeflow_train_config": asdict(cfg), "saeflow_train_stats": stats or {},
        },
    }


def original_config(cfg: MLSAETrainConfig) -> dict[str, Any]:
    """config.json of the original's ``MLSAE`` (its ``PyTorchModelHubMixin`` init kwargs)."""
    return {"layers": list(cfg.layers), "n_inputs": cfg.d_in, "n_latents": cfg.d_sae,
            "k": cfg.k, "dead_steps_threshold": max(1, cfg.dead_tokens_threshold
                                                    // cfg.batch_size),
            "dead_threshold": 1e-3, "auxk": cfg.k_aux, "standardize": cfg.standardise,
            "lens": False}


def save_mlsae(out_dir: str | os.PathLike[str], params: TopKParams, cfg: MLSAETrainConfig,
               stats: dict[str, Any] | None = None, last_fired: Tensor | None = None) -> Path:
    """Write both layouts (module docstring) into ``out_dir`` atomically."""
    w = {n: getattr(params, n).detach().float().cpu().contiguous()
         for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    steps = (last_fired if last_fired is not None else torch.zeros(cfg.d_sae)).cpu()
    original = {"encoder.weight": w["W_enc"].t().contiguous(),
                "decoder.weight": w["W_dec"].t().contiguous(),
                "pre_encoder_bias": w["b_dec"],
                "last_nonzero": (steps // cfg.batch_size).long()}
    with atomic_path(out_dir) as tmp:
        (tmp / "original").mkdir(parents=True)
        save_file(w, tmp / "sae_weights.safetensors")
        text = json.dumps(sae_lens_config(cfg, stats), indent=2, sort_keys=True, default=str)
        (tmp / "cfg.json").write_text(text + "\n")
        save_file(original, tmp / "original" / "model.safetensors")
        (tmp / "original" / "config.json").write_text(
            json.dumps(original_config(cfg), indent=2) + "\n")
    return Path(out_dir)


class LoadedMLSAE(NamedTuple):
    """An MLSAE read from either layout."""

    params: TopKParams
    """Weights in SAELens layout (float32, b_enc zero)."""
    k: int
    """Active latents per row."""
    layers: list[int]
    """Layers it reads."""
    standardise: bool
    """Whether inputs are standardised per row."""


def load_mlsae(path: str | os.PathLike[str]) -> LoadedMLSAE:
    """Read saeflow's layout (``cfg.json``) or the original's (``config.json`` +
    ``model.safetensors``, also found under ``original/``)."""
    path = Path(path)
    if (path / "cfg.json").exists():
        cfg = json.loads((path / "cfg.json").read_text())
        train = cfg.get("metadata", {}).get("saeflow_train_config")
        if not cfg.get("metadata", {}).get("saeflow_mlsae") or not train:
            raise InputFileError(f"{path}/cfg.json: not an MLSAE (no metadata.saeflow_mlsae)")
        w = load_file(path / "sae_weights.safetensors")
        params = TopKParams(*(w[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")))
        return LoadedMLSAE(params, int(cfg["k"]), list(train["layers"]),
                           cfg["normalize_activations"] == "layer_norm")
    return load_original(path)


def load_original(path: str | os.PathLike[str]) -> LoadedMLSAE:
    """Read the original's ``PyTorchModelHubMixin`` folder (``tim-lawson/mlsae-*``)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
        w = load_file(path / "model.safetensors")
    except (OSError, ValueError) as err:
        raise InputFileError(f"{path}: not an MLSAE folder in the original layout "
                             f"(config.json + model.safetensors): {err}") from err
    missing = {"n_inputs", "n_latents", "k", "layers"} - cfg.keys()
    if missing or "encoder.weight" not in w:
        raise InputFileError(f"{path}: config.json lacks {sorted(missing)} or model.safetensors "
                             "lacks encoder.weight")
    if cfg.get("lens"):
        raise InputFileError(f"{path}: tuned-lens MLSAEs (lens: true) are not supported")
    enc, dec = w["encoder.weight"].float(), w["decoder.weight"].float()  # (m, d), (d, m)
    params = TopKParams(enc.t().contiguous(), torch.zeros(enc.shape[0]),
                        dec.t().contiguous(), w["pre_encoder_bias"].float())
    return LoadedMLSAE(params, int(cfg["k"]), list(cfg["layers"]),
                       bool(cfg.get("standardize", True)))


def default_lr(d_sae: int) -> float:
    """Gao et al.'s width scaling of the learning rate (2e-4 at 2^14 latents), for short runs."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
