"""Train BatchTopK, standard (ReLU + L1), JumpReLU and Gated SAEs with SAELens's own training classes.

The loss, the activation function and the inference conversion are SAELens's
(``TrainingSAE.training_forward_pass``, ``save_inference_model``); this module supplies what
SAELens's ``SAETrainer`` ties to its language-model runner: batches from a cached activations
file (:class:`saeflow.batches.ActivationBatches`), a CSV log, and checkpoints that also hold the
data-stream position and the RNG state, so that a resumed run ends with exactly the weights of an
uninterrupted one. The optimisation step mirrors ``SAETrainer._train_step`` in sae-lens 6.54:
Adam, gradient-norm clipping at 1.0, SAELens's LR scheduler (linear warm-up, optional linear
decay) and its ``CoefficientScheduler`` for the L1 / L0 coefficient warm-up.

Outputs: ``out_dir/cfg.json`` + ``sae_weights.safetensors`` (SAELens inference layout; a BatchTopK
SAE is saved as a JumpReLU SAE whose threshold is the learned batch threshold) and
``out_dir/train_log.csv``. The folder is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainingSAEConfig, TrainStepInput
from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler
from torch import Tensor
from tqdm.auto import tqdm

from saeflow import __version__
from saeflow.batches import ActivationBatches
from saeflow.h5io import atomic_path

# architecture -> (SAELens training class, its config class, the sparsity knob it needs)
TRAINING_CLASSES: dict[str, tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig], str]] = {
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, "k"),
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, "l1_coefficient"),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, "l0_coefficient"),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, "l1_coefficient"),
}
SPARSITY_KNOBS = ("k", "l1_coefficient", "l0_coefficient")
# SAELens config fields this module sets itself; sae_options may not override them.
_MANAGED_FIELDS = {
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "metadata",
    "normalize_activations",
    "l1_warm_up_steps",
    "l0_warm_up_steps",
    *SPARSITY_KNOBS,
}
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.csv"
CHECKPOINT_FORMAT = 1
# Config fields that do not change the trained weights; a checkpoint resumes across changes to them.
_RESUME_INDIFFERENT = ("checkpoint_every_steps", "log_every_steps", "device")


@dataclass
class SAELensTrainConfig:
    """Everything that determines a trained SAE; stored in its cfg.json metadata."""

    architecture: str
    """SAELens training architecture: batchtopk, standard, jumprelu or gated."""
    d_in: int
    """Width of the activations (the acts file's second dimension)."""
    d_sae: int
    """Number of SAE latents."""
    batch_size: int
    """Tokens per optimisation step."""
    total_tokens: int
    """Training tokens; the run takes ceil(total_tokens / batch_size) steps (as saeflow.topk)."""
    seed: int = 0
    """Seeds the weight initialisation and the order of the activation batches."""
    lr: float = 3e-4
    """Adam learning rate (SAELens default)."""
    lr_warmup_steps: int = 0
    """Linear LR warm-up from lr / lr_warmup_steps to lr."""
    lr_decay_steps: int = 0
    """Linear LR decay to 0 over the last lr_decay_steps steps (0: none)."""
    adam_beta1: float = 0.9
    """Adam beta1 (SAELens default)."""
    adam_beta2: float = 0.999
    """Adam beta2 (SAELens default)."""
    k: float | None = None
    """batchtopk only: mean number of active latents per token over a batch."""
    l1_coefficient: float | None = None
    """standard and gated only: weight of the decoder-norm-weighted L1 penalty."""
    l0_coefficient: float | None = None
    """jumprelu only: weight of the (straight-through) L0 penalty."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the L1 / L0 coefficient from 0 (SAELens l1_warm_up_steps / l0_warm_up_steps)."""
    normalize_activations: str = "none"
    """'none' or 'expected_average_only_in': scale inputs to mean norm sqrt(d_in) during training
    (Anthropic, April 2024 update); the factor is folded into the saved weights."""
    n_batches_for_norm_estimate: int = 100
    """Batches (from a stream seeded seed + 1) used to estimate the normalisation factor."""
    dead_feature_window: int = 1000
    """A latent that has not fired for this many steps counts as dead (SAELens default)."""
    sae_options: dict[str, Any] = field(default_factory=dict)
    """Further fields of the SAELens training config, e.g. jumprelu_init_threshold,
    jumprelu_bandwidth, jumprelu_sparsity_loss_mode, pre_act_loss_coefficient, aux_loss_coefficient,
    topk_threshold_lr, lp_norm, decoder_init_norm."""
    checkpoint_every_steps: int = 1000
    """Write a resumable checkpoint every this many steps."""
    log_every_steps: int = 10
    """Write a CSV log row every this many steps (and at the last step)."""
    buffer_tokens: int | None = None
    """Shuffle-buffer size passed to ActivationBatches (None: its default)."""
    device: str = "cpu"
    """Torch device for the SAE."""
    hook_name: str | None = None
    """Model site the activations come from (SAELens metadata.hook_name)."""
    model_name: str | None = None
    """Model the activations come from (metadata.model_name)."""
    dataset: str | None = None
    """Corpus the activations come from (metadata.dataset_path)."""

    def __post_init__(self) -> None:
        if self.architecture not in TRAINING_CLASSES:
            raise ValueError(
                f"architecture {self.architecture!r} is not one of {sorted(TRAINING_CLASSES)}"
            )
        for name in ("d_in", "d_sae", "batch_size", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.total_tokens < self.batch_size:
            raise ValueError(
                f"total_tokens ({self.total_tokens}) is less than one batch ({self.batch_size})"
            )
        knob = TRAINING_CLASSES[self.architecture][2]
        for name in SPARSITY_KNOBS:
            value = getattr(self, name)
            if name == knob and value is None:
                raise ValueError(f"architecture {self.architecture!r} requires {name}")
            if name != knob and value is not None:
                raise ValueError(f"{name} does not apply to architecture {self.architecture!r}")
        if self.sparsity_warmup_steps and knob == "k":
            raise ValueError("sparsity_warmup_steps does not apply to architecture 'batchtopk'")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ValueError(
                "normalize_activations must be 'none' or 'expected_average_only_in', "
                f"got {self.normalize_activations!r}"
            )
        _check_sae_options(self.architecture, self.sae_options)

    @property
    def total_steps(self) -> int:
        return -(-self.total_tokens // self.batch_size)


def _check_sae_options(architecture: str, options: dict[str, Any]) -> None:
    cfg_class = TRAINING_CLASSES[architecture][1]
    allowed = {f.name for f in dataclasses.fields(cfg_class)} - _MANAGED_FIELDS
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"sae_options key {key!r} is not a field of {cfg_class.__name__} "
                f"that saeflow lets you set; allowed: {sorted(allowed)}"
            )


class ResumableBatches(Protocol):
    """What the training loop needs from a data stream (ActivationBatches satisfies it)."""

    def __iter__(self) -> Iterator[Tensor]: ...
    def __next__(self) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_training_sae(cfg: SAELensTrainConfig) -> TrainingSAE[Any]:
    """The freshly initialised SAELens training SAE for ``cfg`` (weights seeded by cfg.seed)."""
    sae_class, cfg_class, knob = TRAINING_CLASSES[cfg.architecture]
    kwargs: dict[str, Any] = dict(cfg.sae_options)
    kwargs[knob] = getattr(cfg, knob)
    warmup_name = {"l1_coefficient": "l1_warm_up_steps", "l0_coefficient": "l0_warm_up_steps"}
    if knob in warmup_name:
        kwargs[warmup_name[knob]] = cfg.sparsity_warmup_steps
    metadata = SAEMetadata(
        hook_name=cfg.hook_name,
        model_name=cfg.model_name,
        dataset_path=cfg.dataset,
        saeflow_version=__version__,
        saeflow_training=asdict(cfg),
    )
    sae_cfg = cfg_class(
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        dtype="float32",
        device=cfg.device,
        # checked against SAELens's choices in __post_init__
        normalize_activations=cfg.normalize_activations,  # type: ignore[arg-type]
        metadata=metadata,
        **kwargs,
    )
    torch.manual_seed(cfg.seed)
    return sae_class(sae_cfg)


def to_inference_sae(sae: TrainingSAE[Any]) -> SAE[Any]:
    """The in-memory inference SAE that ``sae.save_inference_model`` would write.

    For BatchTopK this is a JumpReLU SAE whose per-latent threshold is the learned batch threshold.
    """
    state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    inference = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.to(sae.device)


@dataclass
class TrainState:
    """Everything that changes during training and goes into a checkpoint."""

    sae: TrainingSAE[Any]
    optimizer: torch.optim.Adam
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    coefficients: dict[str, CoefficientScheduler]
    steps_since_fired: Tensor  # (d_sae,)
    step: int = 0
    scaling_factor: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "coefficients": {n: s.state_dict() for n, s in self.coefficients.items()},
            "steps_since_fired": self.steps_since_fired,
            "step": self.step,
            "scaling_factor": self.scaling_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, scheduler_state in state["coefficients"].items():
            self.coefficients[name].load_state_dict(scheduler_state)
        self.steps_since_fired = state["steps_since_fired"].to(self.steps_since_fired.device)
        self.step = state["step"]
        self.scaling_factor = state["scaling_factor"]


def init_state(cfg: SAELensTrainConfig) -> TrainState:
    """Fresh SAE, Adam, LR schedule and coefficient schedules, as SAETrainer.__init__ builds them."""
    sae = build_training_sae(cfg)
    optimizer = torch.optim.Adam(
        sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    lr_scheduler = get_lr_scheduler(
        "constant",
        optimizer=optimizer,
        training_steps=cfg.total_steps,
        lr=cfg.lr,
        warm_up_steps=cfg.lr_warmup_steps,
        decay_steps=cfg.lr_decay_steps,
        lr_end=cfg.lr,
        num_cycles=1,
    )
    coefficients = {}
    for name, coef in sae.get_coefficients().items():
        value, warmup = (coef, 0) if isinstance(coef, int | float) else coef
        coefficients[name] = CoefficientScheduler(warm_up_steps=warmup, final_value=value)
    steps_since_fired = torch.zeros(cfg.d_sae, device=sae.device)
    return TrainState(sae, optimizer, lr_scheduler, coefficients, steps_since_fired)


def train_step(state: TrainState, batch: Tensor, dead_feature_window: int) -> dict[str, float]:
    """One optimisation step on a (batch, d_in) tensor, as ``SAETrainer._train_step`` does it.

    Returns the losses and metrics of the step as floats (for the CSV log).
    """
    sae = state.sae
    sae.train()
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=batch,
            coefficients={n: s.value for n, s in state.coefficients.items()},
            dead_neuron_mask=(state.steps_since_fired > dead_feature_window).bool(),
            n_training_steps=state.step,
            is_logging_step=False,
        )
    )
    out.loss.backward()
    # SAETrainer clips at 1.0 unconditionally (sae_trainer.py, "TODO: ... should be in config").
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.lr_scheduler.step()
    for scheduler in state.coefficients.values():
        scheduler.step()
    with torch.no_grad():
        fired = (out.feature_acts != 0).any(dim=0)
        state.steps_since_fired += 1
        state.steps_since_fired[fired] = 0
    state.step += 1
    return step_metrics(out.sae_in, out.sae_out, out.feature_acts, out.loss, out.losses, lr)


@torch.no_grad()
def step_metrics(
    sae_in: Tensor,  # (batch, d_in)
    sae_out: Tensor,  # (batch, d_in)
    feature_acts: Tensor,  # (batch, d_sae)
    loss: Tensor,
    losses: dict[str, Tensor],
    lr: float,
) -> dict[str, float]:
    """Loss terms, L0 and explained variance of one step (SAETrainer's log definitions)."""
    sq_err = (sae_out - sae_in).pow(2).sum(-1).mean()
    total_var = (sae_in - sae_in.mean(0)).pow(2).sum(-1).mean()
    return {
        "lr": lr,
        "loss": loss.item(),
        **{name: value.item() for name, value in sorted(losses.items())},
        "l0": (feature_acts != 0).float().sum(-1).mean().item(),
        "explained_variance": (1 - sq_err / total_var).item(),
    }


def estimate_scaling_factor(batches: Iterator[Tensor], d_in: int, n_batches: int) -> float:
    """sqrt(d_in) / mean token norm, so scaled inputs have mean norm sqrt(d_in) (SAELens)."""
    total, count = 0.0, 0
    for _ in range(n_batches):
        norms = next(batches).float().norm(dim=-1)
        total += norms.sum().item()
        count += norms.numel()
    return math.sqrt(d_in) / (total / count)


def save_checkpoint(
    path: Path, state: TrainState, batches: ResumableBatches, cfg: SAELensTrainConfig
) -> None:
    """Atomically write model, optimiser, schedules, step, data position and RNG state."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": _resume_key(cfg),
        "state": state.state_dict(),
        "batches": batches.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: Path, state: TrainState, batches: ResumableBatches, cfg: SAELensTrainConfig
) -> bool:
    """Restore ``state`` and ``batches`` from ``path``; False if there is no usable checkpoint.

    A checkpoint written for a different configuration is not resumable; it is ignored (with a
    note on stderr) and training starts afresh, since a changed parameter means a new run.
    """
    if not path.exists():
        return False
    payload = torch.load(path, map_location=state.sae.device, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("config") != _resume_key(cfg):
        print(
            f"{path}: checkpoint is for a different configuration; starting afresh", file=sys.stderr
        )
        return False
    state.load_state_dict(payload["state"])
    batches.load_state_dict(payload["batches"])
    torch.set_rng_state(payload["torch_rng"].cpu())
    return True


def _resume_key(cfg: SAELensTrainConfig) -> str:
    """The part of the config a checkpoint must match to be resumed, as a canonical string."""
    key = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_INDIFFERENT}
    return json.dumps(key, sort_keys=True)


class CsvLog:
    """Append-only CSV training log that can be cut back to a checkpoint's step on resume."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            if rows:
                self.fields = list(rows[0])
                writer = csv.DictWriter(f, self.fields)
                writer.writeheader()
                writer.writerows(rows)

    def write(self, row: dict[str, float | int]) -> None:
        with self.path.open("a", newline="") as f:
            if self.fields is None:
                self.fields = list(row)
                csv.DictWriter(f, self.fields).writeheader()
            csv.DictWriter(f, self.fields).writerow(row)


def fit(
    cfg: SAELensTrainConfig,
    batches: ResumableBatches,
    checkpoint_dir: str | os.PathLike[str],
    norm_batches: Iterator[Tensor] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train (or resume training) to cfg.total_steps; returns the final state.

    ``norm_batches`` feeds the normalisation estimate when cfg.normalize_activations asks for it.
    """
    ckpt_dir = Path(checkpoint_dir)
    state = init_state(cfg)
    resumed = load_checkpoint(ckpt_dir / CHECKPOINT_FILE, state, batches, cfg)
    log = CsvLog(ckpt_dir / LOG_FILE, state.step if resumed else None)
    if cfg.normalize_activations != "none" and state.scaling_factor is None:
        if norm_batches is None:
            raise ValueError("normalize_activations needs norm_batches")
        state.scaling_factor = estimate_scaling_factor(
            norm_batches, cfg.d_in, cfg.n_batches_for_norm_estimate
        )
    bar = tqdm(
        total=cfg.total_steps,
        initial=state.step,
        unit="step",
        disable=not progress,
        desc=f"train {cfg.architecture}",
    )
    while state.step < cfg.total_steps:
        batch = next(batches).to(state.sae.device, torch.float32)
        if state.scaling_factor is not None:
            batch = batch * state.scaling_factor
        metrics = train_step(state, batch, cfg.dead_feature_window)
        if state.step % cfg.log_every_steps == 0 or state.step == cfg.total_steps:
            dead = int((state.steps_since_fired > cfg.dead_feature_window).sum())
            log.write(
                {
                    "step": state.step,
                    "tokens": state.step * cfg.batch_size,
                    **metrics,
                    "dead_features": dead,
                }
            )
            bar.set_postfix(mse=f"{metrics['mse_loss']:.4g}", l0=f"{metrics['l0']:.1f}")
        if state.step % cfg.checkpoint_every_steps == 0 and state.step < cfg.total_steps:
            save_checkpoint(ckpt_dir / CHECKPOINT_FILE, state, batches, cfg)
        bar.update(1)
    bar.close()
    return state


@torch.no_grad()
def finalize(
    state: TrainState, cfg: SAELensTrainConfig, last_metrics: dict[str, str] | None
) -> None:
    """Fold the input normalisation into the weights and record end-of-training metadata."""
    if state.scaling_factor is not None:
        state.sae.fold_activation_norm_scaling_factor(state.scaling_factor)
        state.scaling_factor = None
    meta = state.sae.cfg.metadata
    meta.num_dead_features = int((state.steps_since_fired > cfg.dead_feature_window).sum())
    if last_metrics is not None:
        meta.l0 = float(last_metrics["l0"])


def train_sae_lens(
    acts_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: SAELensTrainConfig,
    checkpoint_dir: str | os.PathLike[str],
    progress: bool = True,
    *,
    log_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train an SAE on an activations file and save it in the SAELens layout into ``out_dir``.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same configuration; removes
    the checkpoint once ``out_dir`` is in place. The CSV log is written in ``checkpoint_dir``,
    copied into ``out_dir`` and, when given, to ``log_path`` (the rules' place for every
    trainer's log). Returns a summary of the run.
    """
    with contextlib.ExitStack() as stack:
        batches = stack.enter_context(_batches(acts_path, cfg, cfg.seed))
        norm_batches = None
        if cfg.normalize_activations != "none":
            norm_batches = stack.enter_context(_batches(acts_path, cfg, cfg.seed + 1))
        state = fit(cfg, batches, checkpoint_dir, norm_batches, progress)
    run_log = Path(checkpoint_dir) / LOG_FILE
    last = _last_row(run_log)
    finalize(state, cfg, last)
    with atomic_path(out_dir) as tmp:
        state.sae.save_inference_model(tmp)
        shutil.copyfile(run_log, tmp / LOG_FILE)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(log_path) as tmp:
            shutil.copyfile(run_log, tmp)
    (Path(checkpoint_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    return {
        "architecture": cfg.architecture,
        "out_dir": str(out_dir),
        "steps": state.step,
        "tokens": state.step * cfg.batch_size,
        "final_mse": float(last["mse_loss"]) if last else None,
        "l0": state.sae.cfg.metadata.l0,
        "dead_features": state.sae.cfg.metadata.num_dead_features,
    }


def _batches(
    acts_path: str | os.PathLike[str], cfg: SAELensTrainConfig, seed: int
) -> ActivationBatches:
    """The training stream (seed) or the normalisation-estimate stream (seed + 1)."""
    if cfg.buffer_tokens is None:
        return ActivationBatches(acts_path, cfg.batch_size, seed)
    return ActivationBatches(acts_path, cfg.batch_size, seed, buffer_tokens=cfg.buffer_tokens)


def _last_row(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else None
