"""Benchmark: the error-split regression, streaming normal equations vs in-memory lstsq.

    python benchmarks/bench_regression.py [--sizes 250000 1000000] [--d 576] [--f64-rows 250000]

Synthetic data are generated in chunks and written first to an activations / evaluation HDF5
pair per size, in the layouts the stage reads (so both methods read the same files, from the
page cache). Then, each in its own subprocess so that peak memory (VmHWM) is its own:

- streaming: ``saeflow.dark_matter.error_split.fit_error_regression`` + ``solve`` -- what the
  ``error_split`` stage runs: one pass over all rows, float64 normal equations with a bias column,
  targets [SaeError, ‖SaeError‖²] (d + 1 outputs);
- lstsq_f32: read every row into memory, [x, 1] and the same targets in float32, one
  ``torch.linalg.lstsq`` (the original's method and dtype, plus the bias column);
- lstsq_f64: the same in float64, at ``--f64-rows`` only (float64 at 1M rows would need > 18 GB).

Coefficients are compared with the float64 lstsq solution where there is one, else with the
streaming one. Results go to ``benchmarks/results/regression_cpu.json`` with machine details.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from host import host, proc_field

from saeflow import h5io
from saeflow.dark_matter.error_split import fit_error_regression, open_inputs, targets

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {**host(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__,
            "load_average_at_start": os.getloadavg()}


def vm_kb(key: str) -> int:
    """VmHWM (peak resident set) or VmRSS of this process, in kB."""
    return int(proc_field("/proc/self/status", key).split()[0])


def write_pair(folder: Path, n: int, d: int, chunk: int, seed: int) -> tuple[Path, Path]:
    """acts.h5 (x with unequal means and scales) and eval.h5 (error = Sae(x) - x), chunk by chunk."""
    g = torch.Generator().manual_seed(seed)
    mean, scale = 3 * torch.randn(d, generator=g), 0.5 + torch.rand(d, generator=g)
    mix = 0.3 * torch.rand(d, generator=g)
    acts, sae_eval = folder / f"acts_{n}.h5", folder / f"eval_{n}.h5"
    with h5py.File(acts, "w") as fa, h5py.File(sae_eval, "w") as fe:
        xs = fa.create_dataset("acts", (n, d), "float32", chunks=(chunk, d))
        es = fe.create_dataset("error", (n, d), "float32", chunks=(chunk, d))
        tokens = (np.arange(n) % 49152).astype(np.int32)
        fa["tokens"], fe["tokens"] = tokens, tokens
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = torch.randn(m, d, generator=g) * scale + mean
            # an error with a linear part (mixing neighbouring dims) and a nonlinear part
            err = mix * x + 0.1 * torch.roll(x, 1, 1) + 0.2 * torch.tanh(x) \
                + 0.1 * torch.randn(m, d, generator=g)
            xs[start : start + m], es[start : start + m] = x.numpy(), (-err).numpy()
        for h5 in (fa, fe):
            h5io.mark_complete(h5)
    return acts, sae_eval


def run_streaming(acts_path: str, eval_path: str, chunk: int) -> tuple[dict, np.ndarray]:
    acts, sae_eval = open_inputs(acts_path, eval_path)
    with acts, sae_eval:
        n = acts["acts"].shape[0]
        base = vm_kb("VmRSS")
        t0 = time.perf_counter()
        normal = fit_error_regression(acts, sae_eval, torch.zeros(n, dtype=torch.bool), chunk)
        t1 = time.perf_counter()
        fit = normal.solve()
        t2 = time.perf_counter()
    return {"accumulate_s": t1 - t0, "solve_s": t2 - t1, "time_s": t2 - t0, "base_rss_kb": base,
            "solver": fit.solver}, torch.cat([fit.weight, fit.bias[None]]).numpy()


def run_lstsq(acts_path: str, eval_path: str, chunk: int,
              dtype: torch.dtype) -> tuple[dict, np.ndarray]:
    acts, sae_eval = open_inputs(acts_path, eval_path)
    with acts, sae_eval:
        n, d = acts["acts"].shape
        base = vm_kb("VmRSS")
        t0 = time.perf_counter()
        x, y = torch.empty(n, d + 1, dtype=dtype), torch.empty(n, d + 1, dtype=dtype)
        x[:, d] = 1.0  # the bias column
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            x[rows, :d] = torch.from_numpy(acts["acts"][rows])
            y[rows] = targets(-torch.from_numpy(sae_eval["error"][rows]))
    t1 = time.perf_counter()
    solution = torch.linalg.lstsq(x, y, rcond=1e-9 if dtype == torch.float32 else None).solution
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "solve_s": t2 - t1, "time_s": t2 - t0,
            "base_rss_kb": base}, solution.double().numpy()


def worker(args: argparse.Namespace) -> None:
    if args.worker == "streaming":
        stats, coef = run_streaming(args.acts, args.eval, args.chunk_tokens)
    else:
        dtype = torch.float32 if args.worker == "lstsq_f32" else torch.float64
        stats, coef = run_lstsq(args.acts, args.eval, args.chunk_tokens, dtype)
    np.save(args.coef, coef)
    stats["peak_rss_mb"] = vm_kb("VmHWM") / 1024
    stats["base_rss_mb"] = stats.pop("base_rss_kb") / 1024
    print(json.dumps(stats))


def spawn(method: str, acts: Path, sae_eval: Path, coef: Path, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--acts", str(acts), "--eval",
           str(sae_eval), "--coef", str(coef), "--chunk-tokens", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rel_diff(coef: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(coef - reference).max() / np.abs(reference).max())


def bench_size(folder: Path, n: int, args: argparse.Namespace) -> list[dict]:
    t0 = time.perf_counter()
    acts, sae_eval = write_pair(folder, n, args.d, args.chunk_tokens, seed=n)
    print(f"{n} rows: wrote inputs in {time.perf_counter() - t0:.1f} s", flush=True)
    methods = ["streaming", "lstsq_f32"] + (["lstsq_f64"] if n == args.f64_rows else [])
    runs, coefs = [], {}
    for method in methods:
        coef_path = folder / f"{method}_{n}.npy"
        stats = spawn(method, acts, sae_eval, coef_path, args.chunk_tokens)
        coefs[method] = np.load(coef_path)
        runs.append({"method": method, "rows": n, "d": args.d, **stats})
        print(json.dumps(runs[-1]), flush=True)
    reference = "lstsq_f64" if "lstsq_f64" in coefs else "streaming"
    for run in runs:
        run["max_rel_coef_diff_vs"] = reference
        run["max_rel_coef_diff"] = rel_diff(coefs[run["method"]], coefs[reference])
    for path in (acts, sae_eval):
        path.unlink()
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--f64-rows", type=int, default=250_000, help="size that also runs lstsq_f64")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--workdir", default=None, help="folder for the temporary HDF5 files")
    p.add_argument("--worker", choices=["streaming", "lstsq_f32", "lstsq_f64"], help=argparse.SUPPRESS)
    p.add_argument("--acts", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--coef", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    info, t0 = machine(), time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        runs = [run for n in args.sizes for run in bench_size(Path(tmp), n, args)]
    summary = {}
    for n in args.sizes:
        by = {r["method"]: r for r in runs if r["rows"] == n}
        summary[str(n)] = {
            "streaming_over_lstsq_f32_time": by["streaming"]["time_s"] / by["lstsq_f32"]["time_s"],
            "streaming_peak_rss_mb": by["streaming"]["peak_rss_mb"],
            "lstsq_f32_peak_rss_mb": by["lstsq_f32"]["peak_rss_mb"],
        }
    info["load_average_at_end"] = os.getloadavg()
    result = {"benchmark": "error_split regression", "machine": info,
              "data": "synthetic, generated in chunks and written to an HDF5 acts/eval pair per size",
              "chunk_tokens": args.chunk_tokens, "wall_s": time.perf_counter() - t0,
              "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "regression_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
