"""Benchmark: the whole embedded default, `snakemake -c2`, from an empty results directory.

    python benchmarks/bench_default_run.py                     # clone HEAD to a temp dir, run, record
    python benchmarks/bench_default_run.py --summarize DIR --wall-s 2317   # record a finished run

The run happens in a fresh `git clone` of this checkout's HEAD, so nothing already computed in
`results/` is reused or touched. Every expensive rule writes its own timing under
`results/benchmarks/{rule}/`; this script sums them per rule and writes, with the machine's details
and the wall time, `benchmarks/results/default_run_cpu.json`. Rule seconds add up to more than the
wall time where jobs ran side by side on the 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from host import host

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def rule_seconds(results: Path) -> dict[str, dict[str, float]]:
    """Per rule: job count and summed wall seconds from Snakemake's `benchmark:` files."""
    jobs: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        jobs[rule] += 1
        seconds[rule] += float(rows[-1]["s"])
    order = sorted(seconds, key=lambda rule: seconds[rule], reverse=True)
    return {r: {"jobs": jobs[r], "seconds": round(seconds[r], 1)} for r in order}


def run_default(workdir: Path, cores: int) -> float:
    subprocess.run(["git", "clone", "-q", str(REPO), str(workdir)], check=True)
    env = dict(os.environ, PYTHONPATH=str(workdir / "src"))
    start = time.perf_counter()
    subprocess.run(["snakemake", f"-c{cores}"], cwd=workdir, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summarize", type=Path, help="a finished run's results directory")
    p.add_argument("--wall-s", type=float, help="with --summarize: the run's wall seconds")
    p.add_argument("--commit", help="with --summarize: the commit the run was made at")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "default_run_cpu.json")
    args = p.parse_args()
    if args.summarize and args.wall_s is None:
        p.error("--summarize needs --wall-s")
    info = {"machine_at_summary" if args.summarize else "machine_at_start": {
        **host(), "load_average": os.getloadavg()}}
    if args.summarize:
        results, wall, commit = args.summarize, args.wall_s, args.commit
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
        workdir = Path(tempfile.mkdtemp(prefix="saeflow-default-"))
        wall = run_default(workdir, args.cores)
        results = workdir / "results"
        print(f"run kept in {workdir}", file=sys.stderr)
    rules = rule_seconds(results)
    record = {
        "benchmark": f"snakemake -c{args.cores} on config/config.yaml from an empty results dir",
        "commit": commit, "wall_s": round(wall, 1),
        "jobs_timed": sum(r["jobs"] for r in rules.values()),
        "rule_seconds_total": round(sum(r["seconds"] for r in rules.values()), 1),
        "rules": rules, **info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("wall_s", "jobs_timed", "rule_seconds_total")}))


if __name__ == "__main__":
    main()
