"""Benchmark: saex's ReLU / gated SAE against SAELens's standard SAE, side by side at one L0.

    python benchmarks/bench_saex.py [--acts FILE | --make-acts] [--tokens 1048576] [--gated]

saex (seed 003) claims "comparable results for GPT2-Small Layer 9 with ~25% less tokens and ~3x
lower training time" than SAELens. The issue's goal: a ReLU/gated SAE at the same L0 reaches
SAELens's final FVU with >= 25% fewer tokens and >= 3x less wall time. This runs it on real
SmolLM2-135M layer-6 activations (d 576), the default's width 2,304, 4,096-token batches, 2
threads, all runs on the same batches in the same order:

1. SAELens's ``StandardTrainingSAE`` (ReLU, decoder-norm-weighted L1 coefficient ``--l1``,
   SAELens's defaults otherwise: lr 3e-4 (``--sae-lens-lr``), Adam (0.9, 0.999), inputs scaled to mean norm
   sqrt(d), the step as ``SAETrainer`` takes it: ``saeflow.sae_lens_train.train_step``).
   Its held-out L0 at the end is the target L0, its held-out FVU at the end the target FVU.
2. saeflow's ``architecture: saex`` (``saeflow.saex_train.train_step``: Wright's per-latent
   scale, beta1 0, update projection, clip 1, ``input_norm: wes-mean``, the codes' support
   once sparse) on ``--fractions`` of SAELens's tokens (its schedule complete in each). At
   each fraction the sparsity coefficient is searched (log-log secant on final L0, whole
   runs) until the final L0 is within ``--l0-tolerance`` of the target. Every run is kept.

The claim holds at a fraction f when the matched run's final held-out FVU is at or below the
target: a token saving of 1 - f, and a speed-up of SAELens's summed step time over the run's.
Held-out FVU (``--eval-tokens`` tokens never trained on) and L0 are measured every
``--eval-every`` steps, outside the timed steps; the table also gives each run's first
evaluation at or below both the target FVU and the target L0 (plus the tolerance), since a
ReLU SAE starts dense and a dense code reconstructs well. Runs are sequential, not interleaved
(their lengths differ), so the share of the CPU other processes took is recorded per run.
Results: ``benchmarks/results/saex_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_train import cpu_counters, machine, make_real_acts, other_load
from torch import Tensor

from saeflow import h5io
from saeflow import sae_lens_train as SL
from saeflow import saex_train as SX
from saeflow import techniques as T

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Run:
    """One training run: its knobs, its curve, and the wall time of its steps."""

    name: str
    coefficient: float
    step_s: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # tokens, wall_s, fvu, l0
    other_cpu_share: float | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.curve[-1]

    def first_at_or_below(self, fvu: float, l0: float) -> dict[str, float] | None:
        """The first evaluation at or below both ``fvu`` and ``l0``."""
        return next((p for p in self.curve if p["fvu"] <= fvu and p["l0"] <= l0), None)


# ---------------------------------------------------------------------- data
def load_acts(path: Path, n_eval: int) -> tuple[Tensor, Tensor]:
    """(training rows, held-out rows): the file's first ``n_eval`` rows are held out."""
    with h5io.H5File(path, "r") as h5:
        acts = torch.from_numpy(h5["acts"][:]).float()
    return acts[n_eval:], acts[:n_eval]


def batches(train: Tensor, batch: int, steps: int, seed: int) -> Iterator[Tensor]:
    """``steps`` batches: seeded shuffles of the training rows, epoch after epoch."""
    per_epoch = train.shape[0] // batch
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order = torch.randperm(
                train.shape[0], generator=torch.Generator().manual_seed(seed + epoch)
            )
        yield train[order[i * batch : (i + 1) * batch]]


def heldout_fvu_l0(
    reconstruct: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor
) -> tuple[float, float]:
    """FVU and mean L0 on held-out rows ``x`` (in the frame ``reconstruct`` expects)."""
    with torch.no_grad():
        x_hat, z = reconstruct(x)
    fvu = float((x_hat - x).square().sum() / (x - x.mean(0)).square().sum())
    return fvu, float((z > 0).sum(-1).float().mean())


def train_run(
    run: Run, step: Callable[[Tensor], None], evaluate: Callable[[], tuple[float, float]],
    data: Iterator[Tensor], batch: int, eval_every: int, steps: int,
) -> Run:  # fmt: skip
    """Time every step; evaluate every ``eval_every`` steps and after the last, untimed."""
    start = cpu_counters()
    for i, x in enumerate(data, 1):
        t0 = time.perf_counter()
        step(x)
        run.step_s.append(time.perf_counter() - t0)
        if i % eval_every == 0 or i == steps:
            fvu, l0 = evaluate()
            run.curve.append({"tokens": i * batch, "wall_s": sum(run.step_s), "fvu": fvu, "l0": l0})
            print(f"  {run.name} step {i}/{steps}: held-out FVU {fvu:.4f}, L0 {l0:.1f}, "
                  f"{sum(run.step_s):.1f} s", flush=True)  # fmt: skip
    run.other_cpu_share = other_load(start)
    return run


# ---------------------------------------------------------------------- contestants
def sae_lens_run(train: Tensor, held: Tensor, args: argparse.Namespace, steps: int) -> Run:
    d_in = train.shape[1]
    cfg = SL.SAELensTrainConfig(
        architecture="standard", d_in=d_in, d_sae=args.width, batch_size=args.batch,
        total_tokens=steps * args.batch, l1_coefficient=args.l1,
        normalize_activations="expected_average_only_in", seed=args.seed, lr=args.sae_lens_lr,
    )  # fmt: skip
    state = SL.init_state(cfg)
    scale = math.sqrt(d_in) / float(train.norm(dim=1).mean())  # SAELens's estimate, all rows
    sae, held_scaled = state.sae, held * scale

    def step(x: Tensor) -> None:
        SL.train_step(state, x * scale, cfg.dead_feature_window)

    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        z = sae.encode(x)
        return sae.decode(z), z

    run = Run("sae_lens_standard", args.l1)
    data = batches(train, args.batch, steps, args.seed)
    evaluate = lambda: heldout_fvu_l0(reconstruct, held_scaled)
    return train_run(run, step, evaluate, data, args.batch, args.eval_every, steps)


def saex_run(
    train: Tensor, held: Tensor, args: argparse.Namespace, steps: int, coefficient: float
) -> Run:
    cfg = SX.SaexTrainConfig(
        d_in=train.shape[1], d_sae=args.width, total_tokens=steps * args.batch,
        sparsity_coefficient=coefficient, batch_size=args.batch, seed=args.seed, lr=args.saex_lr,
        lr_warmup_steps=args.saex_warmup, input_norm="wes-mean", gated=args.gated,
    )  # fmt: skip
    data = batches(train, args.batch, steps, args.seed)
    first = next(batches(train, args.batch, 1, args.seed))
    state = SX.init_state(cfg, first)

    def step(x: Tensor) -> None:
        SX.train_step(state, x, cfg)

    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        xn = x * (state.norm_sum / max(state.step, 1))  # wes-mean's running factor
        p = T.ReluParams(*state.leaves[:5])
        if cfg.gated:
            out = T.gated_forward(p, state.leaves[5], state.leaves[6], xn)
        else:
            out = T.relu_forward(p, xn)
        return out.x_hat / (state.norm_sum / max(state.step, 1)), out.z

    name = "saex_gated" if args.gated else "saex_relu"
    run = Run(f"{name} c={coefficient:.4g}", coefficient)
    evaluate = lambda: heldout_fvu_l0(reconstruct, held)
    return train_run(run, step, evaluate, data, args.batch, args.eval_every, steps)


def next_coefficient(runs: list[Run], target_l0: float) -> float:
    """Log-log secant on (coefficient, final L0) of the last two runs (one run: L0 ~ 1/c),
    moving the coefficient by at most 4x."""
    last = runs[-1]
    slope = -1.0
    if len(runs) >= 2 and runs[-2].coefficient != last.coefficient:
        a, b = runs[-2], last
        slope = math.log(b.final["l0"] / a.final["l0"]) / math.log(b.coefficient / a.coefficient)
        slope = min(max(slope, -3.0), -0.2)
    step = (target_l0 / last.final["l0"]) ** (1 / slope)
    return last.coefficient * min(max(step, 0.25), 4.0)  # short runs: L0(c) is not monotone


# ---------------------------------------------------------------------- report
def summarise(reference: Run, runs: list[Run], tolerance: float) -> dict[str, Any]:
    """Each saex run against SAELens's final FVU and L0: at its own end (its tokens and all its
    step time against SAELens's), and at its first evaluation at or below both."""
    target_fvu, target_l0 = reference.final["fvu"], reference.final["l0"]
    ref_tokens, ref_wall = reference.final["tokens"], reference.final["wall_s"]
    rows = []
    for run in runs:
        end = run.final
        hit = run.first_at_or_below(target_fvu, target_l0 * (1 + tolerance))
        rows.append({
            "run": run.name, "coefficient": run.coefficient,
            **{f"final_{k}": v for k, v in end.items()},
            "l0_vs_target": end["l0"] / target_l0,
            "matched_l0": abs(end["l0"] / target_l0 - 1) <= tolerance,
            "final_fvu_at_or_below_target": end["fvu"] <= target_fvu,
            "token_saving": 1 - end["tokens"] / ref_tokens,
            "wall_speedup": ref_wall / end["wall_s"],
            "first_hit_tokens": hit and hit["tokens"], "first_hit_wall_s": hit and hit["wall_s"],
            "median_step_s": sorted(run.step_s)[len(run.step_s) // 2],
            "other_cpu_share": run.other_cpu_share,
        })  # fmt: skip
    matched = [r for r in rows if r["matched_l0"] and r["final_fvu_at_or_below_target"]]
    return {
        "target": {
            "run": reference.name, "l1_coefficient": reference.coefficient, **reference.final,
            "median_step_s": sorted(reference.step_s)[len(reference.step_s) // 2],
            "other_cpu_share": reference.other_cpu_share,
        },
        "runs": rows,
        "best_matched": max(matched, key=lambda r: r["wall_speedup"]) if matched else None,
        "goals": {"token_saving": 0.25, "wall_speedup": 3.0, "l0_tolerance": tolerance},
    }  # fmt: skip


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    s, t, shape = result["summary"], result["summary"]["target"], result["shape"]
    m = result["machine"]
    lines = [
        f"# saex vs SAELens standard, side by side ({m['cpu']}, {m['torch_threads']} threads)",
        "",
        (
            f"Data: {result['data']}. Width {shape['d_sae']}, batch {shape['batch']}, "
            f"{shape['tokens']:,} training tokens a run, {shape['eval_tokens']:,} held-out tokens."
        ),
        "",
        (
            f"Target (SAELens `standard`, l1 {t['l1_coefficient']}, lr {result['sae_lens_lr']:g}; "
            f"saex lr {result['saex_knobs']['lr']:g}): held-out FVU {t['fvu']:.4f} at "
            f"L0 {t['l0']:.1f} after {t['tokens']:,} tokens and {t['wall_s']:.1f} s of steps "
            f"(median step {t['median_step_s']:.3f} s)."
        ),
        "",
        (
            "| run | coefficient | tokens (saving) | final L0 (÷ target) | final FVU | step s "
            "(speed-up) | first eval at both targets: tokens, step s | median step s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["runs"]:
        first = "not reached"
        if r["first_hit_tokens"] is not None:
            first = f"{r['first_hit_tokens']:,}, {r['first_hit_wall_s']:.1f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["run"],
                    f"{r['coefficient']:.4g}",
                    f"{r['final_tokens']:,} ({r['token_saving']:.0%})",
                    f"{r['final_l0']:.1f} ({r['l0_vs_target']:.2f})",
                    f"{r['final_fvu']:.4f}",
                    f"{r['final_wall_s']:.1f} ({r['wall_speedup']:.1f}×)",
                    first,
                    f"{r['median_step_s']:.3f}",
                ]
            )
            + " |"
        )
    best, goals = s["best_matched"], s["goals"]
    verdict = "no run matched the target L0 at or below the target FVU"
    if best is not None:
        met = (
            best["token_saving"] >= goals["token_saving"]
            and best["wall_speedup"] >= goals["wall_speedup"]
        )
        verdict = (
            f"fastest matched run {best['run']}: {best['token_saving']:.0%} fewer tokens, "
            f"{best['wall_speedup']:.1f}x less step time (goals >= {goals['token_saving']:.0%}, "
            f">= {goals['wall_speedup']:g}x: {'met' if met else 'not met'})"
        )
    lines += [
        "",
        f"Matched = final L0 within {goals['l0_tolerance']:.0%} of the target. {verdict}.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--acts", type=Path, help="activations file (h5 with 'acts')")
    p.add_argument(
        "--make-acts", action="store_true", help="cache SmolLM2 layer-6 activations first"
    )
    p.add_argument("--tokens", type=int, default=2**20, help="training tokens per run")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-every", type=int, default=4, help="steps between held-out evaluations")
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l1", type=float, default=5.0, help="SAELens l1_coefficient")
    p.add_argument("--sae-lens-lr", type=float, default=3e-4, help="SAELens's default: 3e-4")
    p.add_argument("--saex-lr", type=float, default=4e-4, help="saex's GPT-2 script: 4e-4")
    p.add_argument("--saex-warmup", type=int, default=16, help="saex LR warm-up steps")
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="saex runs' tokens as fractions of SAELens's (a coefficient search for each)",
    )
    p.add_argument(
        "--saex-coefficient",
        type=float,
        nargs="+",
        default=[0.0055, 0.011],
        help="first coefficient tried at each fraction",
    )
    p.add_argument("--gated", action="store_true", help="saex's gated SAE instead of ReLU")
    p.add_argument("--l0-tolerance", type=float, default=0.1)
    p.add_argument("--max-runs", type=int, default=4, help="saex runs in the coefficient search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n_eval, steps = args.eval_tokens, -(-args.tokens // args.batch)
    path = args.acts or make_real_acts(Path(tempfile.mkdtemp(prefix="bench-saex-")), 280_000, 6)
    train, held = load_acts(path, n_eval)
    print(
        f"{train.shape[0]:,} training rows, {held.shape[0]:,} held out; {steps} steps a run",
        flush=True,
    )
    reference = sae_lens_run(train, held, args, steps)
    runs: list[Run] = []
    guesses = args.saex_coefficient + [args.saex_coefficient[-1]] * len(args.fractions)
    for fraction, coefficient in zip(args.fractions, guesses):
        saex_steps = max(1, round(fraction * steps))
        tried: list[Run] = []
        for _ in range(args.max_runs):
            tried.append(saex_run(train, held, args, saex_steps, coefficient))
            if abs(tried[-1].final["l0"] / reference.final["l0"] - 1) <= args.l0_tolerance:
                break
            coefficient = next_coefficient(tried, reference.final["l0"])
        runs += tried
    result = {
        "command": " ".join(["python", "benchmarks/bench_saex.py", *sys.argv[1:]]),
        "machine": machine("cpu"),
        "data": f"real SmolLM2-135M blocks.6.hook_resid_post activations, {path} "
                f"({train.shape[0] + n_eval:,} tokens)",
        "shape": {"d_in": train.shape[1], "d_sae": args.width, "batch": args.batch,
                  "tokens": steps * args.batch, "eval_tokens": n_eval, "dtype": "float32"},
        "sae_lens_lr": args.sae_lens_lr,
        "saex_knobs": {"lr": args.saex_lr, "lr_warmup_steps": args.saex_warmup, "gated": args.gated,
                       "input_norm": "wes-mean", "defaults": asdict(SX.SaexTrainConfig(1, 1, 1, 0.0))},
        "summary": summarise(reference, runs, args.l0_tolerance),
        "curves": {run.name: run.curve for run in [reference, *runs]},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "saex_gated_cpu" if args.gated else "saex_cpu"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / f"{stem}.md", result)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
