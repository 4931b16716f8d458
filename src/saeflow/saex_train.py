"""Train a ReLU SAE with saex's techniques (neverix/saex ``saex/sae.py``, ``trainer_cache.py``).

Architecture ``saex`` of :mod:`saeflow.train`. The model is :func:`saeflow.techniques.relu_forward`
(ReLU with a per-latent scale, Wright & Sharkey 2024); the loss is
``mean_t |x_hat - x|^2 / mean_t |x - mean(x)|^2`` (the batch FVU) plus
``sparsity_coefficient * mean_t penalty(z_t)`` plus, optionally, DeepMind's scaled ghost grads.
Every other knob is a field of :class:`SaexTrainConfig`, each naming its saex counterpart.
Once the codes are sparse (at most 15% of the (token, latent) pairs active) the loss is built on
their support, with one dense product a step instead of five (:mod:`saeflow.saex_support`).
The optimiser chain is saex's: clip the global gradient norm (1.0), Adam with saex's betas
(beta1 = 0, "crucial for avoiding dead features"; beta2 = 0.99), linear LR warm-up.

Files: the SAELens ``standard`` layout, so ``sae_lens.SAE.load_from_disk`` encodes exactly as the
trained model: the scale ``s`` (> 0) is folded into ``W_enc`` and ``b_enc`` (``relu(a) s = relu(a s)``);
``input_norm="wes"`` is SAELens's ``constant_norm_rescale``; ``wes-mean`` (batch-wise) is folded as
its running dataset-wise factor c (``W_enc c``, ``W_dec / c``, ``b_dec / c``). Resume from a
checkpoint is bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saeflow import __version__
from saeflow import techniques as T
from saeflow.batches import ActivationBatches
from saeflow.h5io import atomic_path
from saeflow.saex_support import MAX_DENSITY, support_loss_terms
from saeflow.topk import geometric_median

CHECKPOINT_FILE = "saex_checkpoint.pt"
LOG_COLUMNS = (
    "step", "tokens", "loss", "fvu", "sparsity", "ghost", "gated_aux", "l0", "dead_fraction", "lr"
)  # fmt: skip


@dataclass
class SaexTrainConfig:
    """One saex-style ReLU SAE training run (all of it goes into cfg.json)."""

    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of latents."""
    total_tokens: int
    """Training tokens; ceil(total_tokens / batch_size) steps."""
    sparsity_coefficient: float
    """Weight of the sparsity penalty (saex sparsity_coefficient)."""
    batch_size: int = 4096
    """Tokens per step."""
    seed: int = 0
    """Seeds the initialisation and the batch order."""
    lr: float = 4e-4
    """Adam learning rate (saex's GPT-2 script: 4e-4)."""
    adam_beta1: float = 0.0
    """saex: 0, 'crucial for avoiding dead features'."""
    adam_beta2: float = 0.99
    """saex's GPT-2 script."""
    lr_warmup_steps: int = 128
    """Linear LR warm-up (saex: 128)."""
    clip_grad_norm: float = 1.0
    """Global gradient-norm clip (saex: optax.clip_by_global_norm(1.0)); 0 disables it."""
    sparsity_loss: str = "l1"
    """l1 | l1_sqrt | tanh | hoyer | recip (saex sparsity_loss_type)."""
    recip_eps: float = 0.1
    """recip's eps after the schedule (saex: ("recip", eps))."""
    recip_anneal_steps: int = 0
    """Anneal recip's eps log-linearly from 1 to recip_eps over this many steps (Farrell's
    schedule as saex's recip_schedule ((steps, eps),)); 0 uses recip_eps throughout."""
    tanh_stretch: float = 1.0
    """tanh(stretch * z) (saex: 1; Llama Scope's tanh loss: 4)."""
    decoder_norm_weighted: bool = False
    """Penalise z * |W_dec row| (saex anthropic_norm)."""
    per_latent_scale: bool = True
    """Learn the Wright-2024 per-latent scale s (saex's s); False keeps s = 1."""
    restrict_dec_norm: str = "exact"
    """exact | lte | none (saex restrict_dec_norm)."""
    project_decoder: str = "updates"
    """none | grads | updates: remove the decoder-parallel part of the gradient or of the Adam
    update (saex project_grads_from_dec / project_updates_from_dec)."""
    ghost_grads: bool = False
    """DeepMind's scaled ghost grads with softplus (saex dm_ghost_grads)."""
    dead_after_steps: int = 500
    """Steps without firing before a latent is dead (saex dead_after: 500 in the GPT-2 script)."""
    input_norm: str = "none"
    """none | wes | wes-mean (saex norm_input)."""
    encoder_init: str = "kaiming"
    """kaiming | orthogonal (saex encoder_init_method)."""
    decoder_init: str = "tied"
    """tied (W_dec = normalised W_enc.T) | orthogonal | pseudoinverse (saex decoder_init_method)."""
    b_dec_init: str = "geom_median"
    """zeros | mean | geom_median of the first batch (saex decoder_bias_init_method)."""
    gated: bool = False
    """saex's gated SAE (saex ``is_gated``, :func:`saeflow.techniques.gated_forward`): the
    sparsity penalty goes on ``relu(gate_pre)``, plus the auxiliary gated reconstruction loss
    with the decoder under stop-gradient; saved as a SAELens ``gated`` SAE (exactly folded)."""
    checkpoint_every_steps: int = 1000
    """Steps between resumable checkpoints."""
    log_every_steps: int = 50
    """Steps between CSV log rows."""
    buffer_tokens: int | None = None
    """Shuffle buffer of the batch stream (None: ActivationBatches' default)."""
    hook_name: str | None = None
    """Model site (SAELens metadata.hook_name)."""
    model_name: str | None = None
    """Model (metadata.model_name)."""
    dataset: str | None = None
    """Corpus (metadata.dataset_path)."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self) -> None:
        allowed = {
            "sparsity_loss": T.SPARSITY_LOSSES,
            "restrict_dec_norm": T.DECODER_NORMS,
            "project_decoder": ("none", "grads", "updates"),
            "input_norm": ("none", "wes", "wes-mean"),
            "encoder_init": ("kaiming", "orthogonal"),
            "decoder_init": ("tied", "orthogonal", "pseudoinverse"),
            "b_dec_init": ("zeros", "mean", "geom_median"),
        }
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"SaexTrainConfig.{name} is {getattr(self, name)!r}, expected one of {options}"
                )
        for name in ("d_in", "d_sae", "total_tokens", "batch_size", "dead_after_steps"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"SaexTrainConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.sparsity_coefficient < 0 or self.lr <= 0 or self.recip_eps <= 0:
            raise ValueError("SaexTrainConfig: sparsity_coefficient >= 0, lr > 0, recip_eps > 0")

    @property
    def total_steps(self) -> int:
        return -(-self.total_tokens // self.batch_size)


# ====================================================================== init and loss
def init_params(cfg: SaexTrainConfig, first: Tensor) -> list[Tensor]:
    """[W_enc (d, m), b_enc, s, W_dec (m, d), b_dec] (+ [s_gate, b_gate] when gated) as
    leaves requiring grad."""
    gen = torch.Generator().manual_seed(cfg.seed)
    d, m = cfg.d_in, cfg.d_sae
    if cfg.encoder_init == "orthogonal":
        W_enc = T.orthogonal_init(m, d, gen).T.contiguous()
    else:  # kaiming uniform, bound sqrt(6 / fan_in) (jax.nn.initializers.kaiming_uniform)
        W_enc = (torch.rand(d, m, generator=gen) * 2 - 1) * math.sqrt(6 / d)
    if cfg.decoder_init == "pseudoinverse":
        W_enc, W_dec = T.pseudoinverse_init(W_enc)
    elif cfg.decoder_init == "orthogonal":
        W_dec = T.orthogonal_init(m, d, gen)
    else:
        W_dec = W_enc.T / W_enc.T.norm(dim=1, keepdim=True)
    x = T.normalize_input(first, cfg.input_norm)[0]
    b_dec = {"zeros": torch.zeros(d), "mean": x.mean(0)}.get(cfg.b_dec_init)
    if b_dec is None:
        b_dec = geometric_median(x).float()
    leaves = [W_enc, torch.zeros(m), torch.ones(m), W_dec.contiguous(), b_dec]
    if cfg.gated:  # s_gate with softplus(s_gate) = 1, b_gate = 0
        leaves += [torch.full((m,), math.log(math.e - 1)), torch.zeros(m)]
    return [t.float().to(cfg.device).requires_grad_(True) for t in leaves]


def sparsity_eps(cfg: SaexTrainConfig, step: int) -> float:
    if cfg.recip_anneal_steps == 0:
        return cfg.recip_eps
    return T.recip_eps(step, [(cfg.recip_anneal_steps, cfg.recip_eps)], eps0=1.0)


def loss_terms(
    leaves: list[Tensor], x: Tensor, cfg: SaexTrainConfig, step: int, dead: Tensor,
    max_density: float = MAX_DENSITY,
) -> dict[str, Tensor]:  # fmt: skip
    """The batch's fvu, sparsity, ghost, gated-aux and total loss, the latents that fired (m,)
    and the mean L0. On the codes' support (:mod:`saeflow.saex_support`) while it holds at most
    ``max_density`` of the (token, latent) pairs; densely otherwise."""
    eps = sparsity_eps(cfg, step)
    on_support = support_loss_terms(leaves, x, cfg, eps, max_density)
    if on_support is not None:
        return on_support
    p = T.ReluParams(*leaves[:5])
    variance = (x - x.mean(0)).square().sum(-1).mean().clamp_min(1e-12)
    aux = x.new_zeros(())
    if cfg.gated:
        g = T.gated_forward(p, leaves[5], leaves[6], x)
        pre, z, x_hat, penalised = g.pre, g.z, g.x_hat, F.relu(g.gate_pre)
        aux = T.gated_aux_loss(g.gate_pre, p.W_dec, p.b_dec, x).mean() / variance
    else:
        out = T.relu_forward(p, x)
        pre, z, x_hat, penalised = out.pre, out.z, out.x_hat, out.z
    fvu = (x_hat - x).square().sum(-1).mean() / variance
    norms = p.W_dec.norm(dim=1) if cfg.decoder_norm_weighted else None
    penalty = T.sparsity_penalty(
        penalised, cfg.sparsity_loss, eps=eps, stretch=cfg.tanh_stretch,
        decoder_norms=norms,
    ).mean()  # fmt: skip
    ghost = x.new_zeros(())
    if cfg.ghost_grads:
        ghost = T.dm_ghost_loss(x, x_hat, pre, p.s, p.W_dec, dead) / variance
    loss = fvu + cfg.sparsity_coefficient * penalty + ghost + aux
    active = z.detach() > 0
    return {"loss": loss, "fvu": fvu, "sparsity": penalty, "ghost": ghost, "gated_aux": aux,
            "fired": active.any(0), "l0": active.sum(-1).to(x.dtype).mean()}  # fmt: skip


# ====================================================================== state and step
@dataclass
class SaexState:
    leaves: list[Tensor]
    optimizer: torch.optim.Adam
    step: int = 0
    steps_since_fired: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    norm_sum: float = 0.0
    """Sum over steps of wes-mean's batch factor (its mean is folded into the saved weights)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "leaves": [t.detach() for t in self.leaves], "optimizer": self.optimizer.state_dict(),
            "step": self.step, "steps_since_fired": self.steps_since_fired,
            "norm_sum": self.norm_sum,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for leaf, saved in zip(self.leaves, state["leaves"]):
                leaf.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.norm_sum = int(state["step"]), float(state["norm_sum"])
        self.steps_since_fired.copy_(state["steps_since_fired"])


def init_state(cfg: SaexTrainConfig, first: Tensor) -> SaexState:
    leaves = init_params(cfg, first)
    opt = torch.optim.Adam(leaves, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    dead = torch.zeros(cfg.d_sae, dtype=torch.int64, device=cfg.device)
    return SaexState(leaves, opt, 0, dead)


def lr_at(step: int, cfg: SaexTrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup_steps, 1))


def train_step(
    state: SaexState, x: Tensor, cfg: SaexTrainConfig, max_density: float = MAX_DENSITY
) -> dict[str, float]:
    """One step: loss, backward, clip, Adam, decoder projection and norm restriction
    (``max_density``: see :func:`loss_terms`)."""
    x, c = T.normalize_input(x, cfg.input_norm)
    state.norm_sum += float(c.mean())
    dead = state.steps_since_fired > cfg.dead_after_steps
    terms = loss_terms(state.leaves, x, cfg, state.step, dead, max_density)
    state.optimizer.zero_grad(set_to_none=False)
    terms["loss"].backward()
    s, W_dec = state.leaves[2], state.leaves[3]
    assert s.grad is not None and W_dec.grad is not None
    with torch.no_grad():
        if not cfg.per_latent_scale:
            s.grad.zero_()
        if cfg.project_decoder == "grads":
            W_dec.grad.copy_(T.project_parallel(W_dec, W_dec.grad))
        if cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(state.leaves, cfg.clip_grad_norm)
        before = W_dec.detach().clone() if cfg.project_decoder == "updates" else None
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(state.step, cfg)
        state.optimizer.step()
        if before is not None:  # keep only the update's part orthogonal to the old rows
            W_dec.copy_(before + T.project_parallel(before, W_dec - before))
        W_dec.copy_(T.restrict_decoder_norm(W_dec, cfg.restrict_dec_norm))
        s.clamp_(min=1e-6)  # s > 0 so that it folds into the encoder at save time
        state.steps_since_fired.add_(1).masked_fill_(terms.pop("fired"), 0)
    state.step += 1
    row = {key: float(v.detach()) for key, v in terms.items()}
    row["dead_fraction"] = float(dead.float().mean())
    return row


# ====================================================================== files
def inference_weights(state: SaexState, cfg: SaexTrainConfig) -> dict[str, Tensor]:
    """SAELens standard (gated: SAELens gated) weights encoding exactly as the trained model.

    Gated: SAELens's gate is ``xc W + b_gate``, its magnitude ``relu(xc W exp(r_mag) + b_mag)``;
    with ``g = softplus(s_gate) s``: ``W = W_enc g``, ``r_mag = -log softplus(s_gate)`` (so
    ``W exp(r_mag) = W_enc s``), ``b_mag = b_enc s`` (see the module docstring for the rest)."""
    leaves = [t.detach().double().cpu() for t in state.leaves]
    W_enc, b_enc, s, W_dec, b_dec = leaves[:5]
    c = state.norm_sum / max(state.step, 1) if cfg.input_norm == "wes-mean" else 1.0
    W_dec, b_dec = W_dec / c, b_dec / c
    if cfg.gated:
        s_gate, b_gate = leaves[5:]
        soft = torch.nn.functional.softplus(s_gate)
        raw = {
            "W_enc": W_enc * (soft * s) * c, "b_gate": b_gate, "r_mag": -torch.log(soft),
            "b_mag": b_enc * s, "W_dec": W_dec, "b_dec": b_dec,
        }  # fmt: skip
    else:
        raw = {"W_enc": W_enc * s * c, "b_enc": b_enc * s, "W_dec": W_dec, "b_dec": b_dec}
    return {key: v.float().contiguous() for key, v in raw.items()}


def sae_lens_cfg(cfg: SaexTrainConfig, stats: dict[str, Any]) -> dict[str, Any]:
    from saeflow.topk import _sae_lens_version

    norm = "constant_norm_rescale" if cfg.input_norm == "wes" else "none"
    meta = {
        "sae_lens_version": _sae_lens_version(), "model_name": cfg.model_name,
        "hook_name": cfg.hook_name, "dataset_path": cfg.dataset, "training_architecture": "saex",
        "saeflow_version": __version__, "saeflow_train_config": asdict(cfg),
        "saeflow_train_stats": stats,
    }  # fmt: skip
    return {
        "architecture": "gated" if cfg.gated else "standard", "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": norm,
        "reshape_activations": "none", "metadata": meta,
    }  # fmt: skip


def save(out_dir: Path, state: SaexState, cfg: SaexTrainConfig, stats: dict[str, Any]) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(inference_weights(state, cfg), tmp / "sae_weights.safetensors")
        text = json.dumps(sae_lens_cfg(cfg, stats), indent=2, sort_keys=True, default=str)
        (tmp / "cfg.json").write_text(text + "\n")


def _resume_key(cfg: SaexTrainConfig) -> str:
    key = asdict(cfg)
    for name in ("total_tokens", "checkpoint_every_steps", "log_every_steps", "device"):
        del key[name]
    return json.dumps(key, sort_keys=True)


def _checkpoint(path: Path, state: SaexState, batches: ActivationBatches, cfg: SaexTrainConfig):
    payload = {
        "config": _resume_key(cfg), "state": state.state_dict(),
        "batches": batches.state_dict(), "torch_rng": torch.get_rng_state(),
    }  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume(path: Path, cfg: SaexTrainConfig, batches: ActivationBatches) -> SaexState | None:
    if not path.exists():
        return None
    payload = torch.load(path, map_location=cfg.device, weights_only=True)
    if payload.get("config") != _resume_key(cfg):
        print(f"{path}: checkpoint of another configuration; starting afresh", file=sys.stderr)
        return None
    state = init_state(cfg, torch.zeros(2, cfg.d_in))
    state.load_state_dict(payload["state"])
    batches.load_state_dict(payload["batches"])
    torch.set_rng_state(payload["torch_rng"].cpu())
    return state


def train_saex(
    acts_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: SaexTrainConfig,
    checkpoint_dir: str | os.PathLike[str],
    progress: bool = True,
    *,
    log_path: str | os.PathLike[str] | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) on an activations file; write the SAELens folder ``out_dir``.

    The CSV log goes to ``log_path`` (default: ``checkpoint_dir/train_log.csv``)."""
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else ckpt.with_name("train_log.csv")
    log.parent.mkdir(parents=True, exist_ok=True)
    kw = {} if cfg.buffer_tokens is None else {"buffer_tokens": cfg.buffer_tokens}
    end = cfg.total_steps if stop_after_steps is None else min(stop_after_steps, cfg.total_steps)
    with ActivationBatches(acts_path, cfg.batch_size, cfg.seed, **kw) as batches:
        state = _resume(ckpt, cfg, batches)
        first = None
        if state is None:
            first = next(batches)
            state = init_state(cfg, first)
            _start_log(log)
        row: dict[str, Any] = {}
        for _ in tqdm(range(state.step, end), disable=not progress, unit="step"):
            x = (first if first is not None else next(batches)).to(cfg.device)
            first = None
            row = train_step(state, x, cfg)
            if state.step % cfg.log_every_steps == 0 or state.step == end:
                _append_log(log, state, cfg, row)
            if state.step % cfg.checkpoint_every_steps == 0 or state.step == end:
                _checkpoint(ckpt, state, batches, cfg)
    stats = {"steps": state.step, "tokens": state.step * cfg.batch_size, **row}
    if state.step >= cfg.total_steps:
        save(Path(out_dir), state, cfg, stats)
    return stats


def _start_log(path: Path) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerow(LOG_COLUMNS)


def _append_log(path: Path, state: SaexState, cfg: SaexTrainConfig, row: dict[str, Any]) -> None:
    values = {**row, "step": state.step, "tokens": state.step * cfg.batch_size}
    values["lr"] = lr_at(state.step - 1, cfg)
    with path.open("a", newline="") as f:
        csv.writer(f).writerow([values.get(c, "") for c in LOG_COLUMNS])
