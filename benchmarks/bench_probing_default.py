"""Record the probing jobs of a finished run of the embedded default (not a timed test).

    PYTHONPATH=src nice -n 19 snakemake -c2 --configfile config/config.yaml \\
        --config workdir=DIR -- tables/probing_datasets.csv plots/probing/{normal,...}.pdf
    python benchmarks/bench_probing_default.py --summarize DIR --wall-s 1930 --load "6.3 (1-min mean)"

Reads every ``benchmarks/probing_*/**.tsv`` of the run (Snakemake's ``benchmark:`` files: wall
``s`` and ``cpu_time`` per job) and writes them, their sums, the headline numbers of
``plots/probing/*.csv`` and the machine's details to ``benchmarks/results/probing_default_cpu.json``.
Wall seconds depend on the machine's load (stated with them); CPU seconds much less so.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from host import host

REPO = Path(__file__).resolve().parent.parent


def jobs(workdir: Path) -> list[dict[str, object]]:
    out = []
    for tsv in sorted((workdir / "benchmarks").glob("probing_*/**/*.tsv")):
        with open(tsv) as f:
            (row,) = list(csv.DictReader(f, delimiter="\t"))
        out.append({"job": str(tsv.relative_to(workdir / "benchmarks").with_suffix("")),
                    "wall_s": round(float(row["s"]), 1),
                    "cpu_s": round(float(row["cpu_time"]), 1),
                    "max_rss_mb": round(float(row["max_rss"]), 0)})
    return out


def headlines(workdir: Path) -> dict[str, list[dict[str, str]]]:
    out = {}
    for table in sorted((workdir / "plots" / "probing").glob("*.csv")):
        with open(table) as f:
            out[table.stem] = list(csv.DictReader(f))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summarize", type=Path, required=True, help="the run's workdir")
    p.add_argument("--wall-s", type=float, required=True, help="the run's wall seconds")
    p.add_argument("--load", required=True, help="the machine's load average during the run")
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks" / "results" / "probing_default_cpu.json")
    args = p.parse_args()
    rows = jobs(args.summarize)
    record = {"host": host(), "wall_s": args.wall_s, "load_average": args.load,
              "note": args.note, "jobs": rows,
              "sum_cpu_s": round(sum(float(str(r["cpu_s"])) for r in rows), 1),
              "sum_job_wall_s": round(sum(float(str(r["wall_s"])) for r in rows), 1),
              "tables": headlines(args.summarize)}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(rows)} jobs, {record['sum_cpu_s']} CPU s -> {args.out}")


if __name__ == "__main__":
    main()
