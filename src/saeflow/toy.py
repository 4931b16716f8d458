"""Toy models with ground truth: synthetic activations from a known sparse dictionary.

After saex's ``toy_models`` (neverix/saex) and the toy setting of Sharkey et al. 2022
("Taking features out of superposition with sparse autoencoders"): each token is
``x = sum_i c_i f_i + noise`` with ``n_features`` unit-norm true features ``f_i`` in ``d``
dimensions (``n_features > d``: superposition), a sparse non-negative code ``c``, and Gaussian
noise. What is configurable:

- **frequencies**: feature i fires with probability ``p_i ∝ (i + 1) ** -freq_decay`` (Zipf-like,
  as real SAE latents are; ``freq_decay = 0`` is uniform), scaled so that the expected number of
  active features per token is ``mean_active`` (the "right L0");
- **correlations**: features come in pairs (2j, 2j+1); with probability ``correlation`` the
  partner of an active feature fires too (Sharkey et al.'s correlated variant, simplified to pairs);
- **magnitudes**: log-normal, ``magnitude * exp(magnitude_log_std * N(0, 1))``;
- **noise**: isotropic Gaussian of standard deviation ``noise / sqrt(d)`` per coordinate.

Everything is seeded. :func:`write_toy` writes the activations in the layout of
``acts/{model}/{corpus}/{site}.h5`` (dataset ``acts`` float32 chunked along tokens, ``tokens``,
attributes ``model`` / ``corpus`` / ``site``, ``complete``), so the SAE trainers read it as they read
cached model activations, and the true dictionary beside it.

:func:`recovery` scores a trained SAE against the truth: MMCS (mean over true features of the
largest cosine with any decoder row; Sharkey et al.), the share of true features recovered at
cosine >= 0.9, the dead-latent fraction, L0 and FVU on fresh tokens from the same generator.

    python -m saeflow.toy generate --out toy/{name}/acts.h5 --dictionary toy/{name}/dictionary.h5 ...
    python -m saeflow.toy recovery --dictionary D.h5 --sae NAME=DIR ... --out tables/toy_recovery.csv
    python -m saeflow.toy plot --table tables/toy_recovery.csv --out plots/toy_recovery.pdf
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch import Tensor

from saeflow import h5io

RECOVERY_COLUMNS = (
    "dataset", "sae", "architecture", "d_sae", "mmcs", "recovered_0.9", "dead_fraction", "l0",
    "true_l0", "fvu",
)  # fmt: skip
RECOVERED_COSINE = 0.9
"""A true feature counts as recovered when some decoder row has cosine >= this (Sharkey et al.)."""


# ====================================================================== configuration
@dataclass(frozen=True)
class ToyConfig:
    """One synthetic data set: the dictionary and how codes are drawn from it."""

    d: int = 64
    """Dimension of the activations."""
    n_features: int = 128
    """Number of true features (> d: superposition)."""
    n_tokens: int = 65536
    """Tokens written for training."""
    mean_active: float = 4.0
    """Expected number of active features per token (before pairing), the target L0."""
    freq_decay: float = 0.0
    """Exponent of the feature-frequency power law (0: every feature equally frequent)."""
    correlation: float = 0.0
    """Probability that an active feature's pair partner fires too."""
    magnitude: float = 1.0
    """Median magnitude of an active feature."""
    magnitude_log_std: float = 0.0
    """Standard deviation of the log-magnitude (0: every active feature has ``magnitude``)."""
    noise: float = 0.0
    """Norm scale of the isotropic Gaussian noise added to every token."""
    seed: int = 0
    """Seeds the dictionary and the codes."""
    chunk_tokens: int = 4096
    """HDF5 chunk along tokens (the layout saeflow.activations writes)."""

    def __post_init__(self) -> None:
        for name in ("d", "n_features", "n_tokens", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(
                f"ToyConfig.mean_active must be in (0, n_features={self.n_features}], "
                f"got {self.mean_active}"
            )
        if not 0 <= self.correlation <= 1:
            raise ValueError(f"ToyConfig.correlation must be in [0, 1], got {self.correlation}")
        for name in ("freq_decay", "magnitude_log_std", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"ToyConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.magnitude > 0:
            raise ValueError(f"ToyConfig.magnitude must be positive, got {self.magnitude}")


class ToyTruth(NamedTuple):
    """The ground truth of a toy data set."""

    dictionary: Tensor
    """(n_features, d) unit-norm true features."""
    probabilities: Tensor
    """(n_features,) firing probability of each feature before pairing."""


# ====================================================================== pure generator
def make_truth(cfg: ToyConfig) -> ToyTruth:
    """The seeded dictionary and firing probabilities (clipped at 1, then rescaled)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    D = torch.randn(cfg.n_features, cfg.d, generator=gen, dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    ranks = torch.arange(1, cfg.n_features + 1, dtype=torch.float64)
    p = ranks.pow(-cfg.freq_decay)
    for _ in range(50):  # rescale to the wanted sum; clipping at 1 moves mass to the rest
        p = (p * cfg.mean_active / p.sum()).clamp(max=1.0)
    return ToyTruth(D, p)


def sample_codes(truth: ToyTruth, cfg: ToyConfig, n: int, gen: torch.Generator) -> Tensor:
    """(n, n_features) sparse non-negative codes: Bernoulli firing, pair correlation, log-normal
    magnitudes."""
    p = truth.probabilities
    fire = torch.rand(n, p.numel(), generator=gen, dtype=torch.float64) < p
    if cfg.correlation > 0:
        partner = torch.arange(p.numel()) ^ 1  # (2j, 2j+1) pairs
        partner = partner.clamp(max=p.numel() - 1)
        drag = torch.rand(n, p.numel(), generator=gen, dtype=torch.float64) < cfg.correlation
        fire = fire | (fire[:, partner] & drag)
    mags = cfg.magnitude * torch.exp(
        cfg.magnitude_log_std * torch.randn(n, p.numel(), generator=gen, dtype=torch.float64)
    )
    return fire * mags


def sample_acts(truth: ToyTruth, cfg: ToyConfig, n: int, gen: torch.Generator) -> Tensor:
    """(n, d) float32 activations ``codes @ dictionary + noise``."""
    codes = sample_codes(truth, cfg, n, gen)
    x = codes @ truth.dictionary
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * (
            cfg.noise / math.sqrt(cfg.d)
        )
    return x.float()


def write_toy(cfg: ToyConfig, acts_path: str | Path, dict_path: str | Path, name: str) -> None:
    """Write the training activations (the trainers' acts layout) and the truth, atomically."""
    truth = make_truth(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    chunk = min(cfg.chunk_tokens, cfg.n_tokens)
    with h5io.atomic_path(acts_path) as tmp, h5py.File(tmp, "w") as h5:
        acts = h5.create_dataset("acts", (cfg.n_tokens, cfg.d), "float32", chunks=(chunk, cfg.d))
        h5.create_dataset("tokens", data=np.zeros(cfg.n_tokens, np.int32), chunks=(chunk,))
        for start in range(0, cfg.n_tokens, chunk):
            n = min(chunk, cfg.n_tokens - start)
            acts[start : start + n] = sample_acts(truth, cfg, n, gen).numpy()
        h5io.write_attrs(h5, {"model": "toy", "corpus": name, "site": "toy", "toy": asdict(cfg)})
        h5io.mark_complete(h5)
    with h5io.atomic_path(dict_path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("dictionary", data=truth.dictionary.numpy())
        h5.create_dataset("probabilities", data=truth.probabilities.numpy())
        h5io.write_attrs(h5, {"toy": asdict(cfg), "name": name})
        h5io.mark_complete(h5)


def read_toy(dict_path: str | Path) -> tuple[ToyConfig, ToyTruth, str]:
    """The config, truth and name stored by :func:`write_toy`."""
    import json

    with h5io.open_checked(dict_path, {"dictionary": (None, None), "probabilities": (None,)}) as h5:
        cfg = ToyConfig(**json.loads(str(h5io.plain(h5.attrs["toy"]))))
        truth = ToyTruth(_array(h5, "dictionary"), _array(h5, "probabilities"))
        name = h5io.plain(h5.attrs["name"])
    return cfg, truth, str(name)


def _array(h5: h5py.File, name: str) -> Tensor:
    dataset = h5[name]
    assert isinstance(dataset, h5py.Dataset)
    return torch.from_numpy(np.asarray(dataset[()]))


# ====================================================================== recovery
class Recovery(NamedTuple):
    """How well one SAE recovers the true dictionary."""

    mmcs: float
    """Mean over true features of the largest cosine with any decoder row."""
    recovered: float
    """Share of true features whose largest cosine is >= RECOVERED_COSINE."""
    dead_fraction: float
    """Share of latents that never fired on the evaluation tokens."""
    l0: float
    """Mean active latents per evaluation token."""
    fvu: float
    """Fraction of variance unexplained on the evaluation tokens."""


def max_cosines(true_dict: Tensor, W_dec: Tensor) -> Tensor:
    """(n_features,) largest cosine of each true feature with any decoder row (m, d), float64."""
    a = true_dict.double() / true_dict.double().norm(dim=1, keepdim=True)
    b = W_dec.double() / W_dec.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).amax(dim=1)


def recovery_stats(
    true_dict: Tensor, W_dec: Tensor, x: Tensor, z: Tensor, x_hat: Tensor
) -> Recovery:
    """Scores from the true dictionary, the SAE's decoder and its codes ``z`` (n, m) and
    reconstructions ``x_hat`` of evaluation tokens ``x`` (n, d)."""
    cos = max_cosines(true_dict, W_dec)
    x, x_hat = x.double(), x_hat.double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    active = z != 0
    return Recovery(
        mmcs=float(cos.mean()),
        recovered=float((cos >= RECOVERED_COSINE).double().mean()),
        dead_fraction=float((~active.any(0)).double().mean()),
        l0=float(active.sum(1).double().mean()),
        fvu=fvu,
    )


def evaluate_sae(sae_dir: str | Path, cfg: ToyConfig, truth: ToyTruth, n_eval: int) -> Recovery:
    """Load an SAE folder with SAELens (any saved architecture) and score it on fresh tokens."""
    from saeflow.saes import load_sae

    sae = load_sae(sae_dir)
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # not the training stream (seed + 1)
    x = sample_acts(truth, cfg, n_eval, gen)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    return recovery_stats(truth.dictionary, sae.W_dec.detach(), x, z, x_hat)


def true_l0(cfg: ToyConfig, truth: ToyTruth, n_eval: int) -> float:
    """Mean number of active true features per evaluation token (pairing included)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    return float((sample_codes(truth, cfg, n_eval, gen) > 0).sum(1).double().mean())


def recovery_table(
    dict_paths: Sequence[str], saes: Sequence[tuple[str, str]], n_eval: int
) -> list[dict[str, Any]]:
    """One row per (dataset, SAE); ``saes`` are (name, folder) with the folder under the
    dataset's directory (``toy/{dataset}/saes/{name}``), matched by the dictionary's name."""
    import json

    rows = []
    for dict_path in dict_paths:
        cfg, truth, name = read_toy(dict_path)
        l0_true = true_l0(cfg, truth, n_eval)
        for sae_name, sae_dir in saes:
            if Path(sae_dir).parent.parent != Path(dict_path).parent:
                continue
            meta = json.loads((Path(sae_dir) / "cfg.json").read_text())
            score = evaluate_sae(sae_dir, cfg, truth, n_eval)
            rows.append({
                "dataset": name, "sae": sae_name,
                "architecture": meta.get("metadata", {}).get("training_architecture")
                or meta["architecture"],
                "d_sae": meta["d_sae"], "mmcs": score.mmcs, "recovered_0.9": score.recovered,
                "dead_fraction": score.dead_fraction, "l0": score.l0, "true_l0": l0_true,
                "fvu": score.fvu,
            })  # fmt: skip
    return rows


# ====================================================================== figure
def plot_recovery(table: str, out: str, width: float, height: float) -> Path:
    """Bars of MMCS and recovered share per SAE (one panel per data set), L0 annotated."""
    from saeflow.figures.pdf import read_table, save_pdf

    df = read_table(table, RECOVERY_COLUMNS)
    datasets = list(dict.fromkeys(df["dataset"]))

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, len(datasets), squeeze=False)[0]
        for ax, name in zip(axes, datasets):
            part = df[df["dataset"] == name].reset_index(drop=True)
            pos = np.arange(len(part))
            ax.bar(pos - 0.2, part["mmcs"], 0.4, label="MMCS")
            ax.bar(pos + 0.2, part["recovered_0.9"], 0.4, label="recovered (cos ≥ 0.9)")
            for i, row in part.iterrows():
                ax.annotate(f"L0 {row['l0']:.1f}", (float(i), 1.02), ha="center", fontsize=6)  # type: ignore[arg-type]
            ax.set_xticks(pos, part["sae"], rotation=45, ha="right")
            ax.set_ylim(0, 1.12)
            ax.axhline(RECOVERED_COSINE, color="grey", lw=0.5, ls="--")
            ax.set_title(f"{name} (true L0 {float(np.asarray(part['true_l0'])[0]):.1f})")
        axes[0].legend(loc="lower left", fontsize=6)

    return save_pdf(draw, table, out, width, height, 8)


# ====================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m saeflow.toy", description=(__doc__ or "").split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write toy activations and their true dictionary")
    gen.add_argument("--out", required=True, help="activations file (acts layout)")
    gen.add_argument("--dictionary", required=True, help="true dictionary file")
    gen.add_argument("--name", required=True, help="data set name (the acts file's corpus)")
    for f in fields(ToyConfig):
        gen.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    rec = sub.add_parser("recovery", help="score trained SAEs against the true dictionary")
    rec.add_argument("--dictionary", nargs="+", required=True, help="true dictionary files")
    rec.add_argument(
        "--sae", nargs="+", required=True, help="NAME=FOLDER, FOLDER under toy/{dataset}/saes/"
    )
    rec.add_argument("--n-eval", type=int, default=8192, help="fresh evaluation tokens")
    rec.add_argument("--out", required=True, help="CSV table")
    plot = sub.add_parser("plot", help="draw the recovery figure")
    plot.add_argument("--table", required=True)
    plot.add_argument("--out", required=True)
    plot.add_argument("--width", type=float, default=7.0)
    plot.add_argument("--height", type=float, default=3.0)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        cfg = ToyConfig(**{f.name: getattr(args, f.name) for f in fields(ToyConfig)})
        write_toy(cfg, args.out, args.dictionary, args.name)
    elif args.command == "recovery":
        import pandas as pd

        pairs = []
        for item in args.sae:
            name, sep, folder = item.partition("=")
            if not sep:
                raise SystemExit(f"saeflow.toy: error: --sae {item!r}: expected NAME=FOLDER")
            pairs.append((name, folder))
        rows = recovery_table(args.dictionary, pairs, args.n_eval)
        with h5io.atomic_path(args.out) as tmp:
            pd.DataFrame(rows, columns=pd.Index(RECOVERY_COLUMNS)).to_csv(tmp, index=False)
    else:
        plot_recovery(args.table, args.out, args.width, args.height)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
