"""config/test.yaml on a real single-node SLURM cluster, through `snakemake --profile slurm`.

Runs .ci/slurm/run-test-config.sh from the session's copy of the repository (``workflow_snapshot``,
so that it runs the same code as ``clean_run``; the top-level `slurm` link is copied too). The
script installs munge and slurm-wlm from Debian packages,
starts the daemons by hand (one node, partitions debug and gpu, fake GPUs) and builds every target
of the test config through sbatch, with one injected transient failure. Meanwhile it runs one job
past its time limit. Then it stops the cluster. The tests read the evidence it leaves behind:
Snakemake's log, `scontrol show job` for every job, and what each stage process saw of SLURM
(.ci/slurm/probe/sitecustomize.py).

It needs root and apt-get (or slurm-wlm already installed) and skips with that reason elsewhere.
CI runs as root, so there it runs. Expect 5 to 10 minutes on 2 cores.
"""

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

# Tables that record how long training took (by design), with those columns.
TIMED_TABLES = {"tables/training_comparison.csv": ["wall_s"]}

# run-test-config.sh bounds each snakemake call itself (timeout -s INT); this is a last resort.
TIMEOUT_S = 3600


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: installs slurm-wlm and munge and starts slurmctld, slurmd and munged"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "needs apt-get (Debian) to install slurm-wlm, or slurm-wlm installed"
    return None


if (_reason := _skip_reason()) is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=_reason)]


def scontrol_jobs(text: str) -> dict[str, dict[str, str]]:
    """`scontrol -o show job` output by job id (each line holds space-separated KEY=VALUE)."""
    jobs = {}
    for line in text.splitlines():
        if line.startswith("JobId="):
            job = dict(f.split("=", 1) for f in line.split() if "=" in f)
            jobs[job["JobId"]] = job
    return jobs


def comment_rule(job: dict[str, str]) -> str:
    """The rule, from the plugin's `--comment rule_<rule>[_wildcards_...]`."""
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


def planned_counts(log: str) -> Counter:
    """The first "Job stats" table of a Snakemake log: jobs per rule."""
    table = log.split("Job stats:", 1)[1].split("\ntotal", 1)[0]
    rows = re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)
    return Counter({m[1]: int(m[2]) for m in rows})


def submissions(log: str) -> list[tuple[str, str, bool]]:
    """(SLURM job id, rule, whether the rule declares gpu=1) for every sbatch of a run, joined
    through the job blocks that Snakemake prints before it submits them."""
    blocks: dict[str, dict] = {}
    current: dict | None = None
    out = []
    for line in log.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):$", line):
            current = {"rule": m[1], "gpu": False}
        elif current is not None and (m := re.match(r"\s+jobid: (\d+)$", line)):
            blocks[m[1]] = current
        elif current is not None and (m := re.match(r"\s+resources: (.*)$", line)):
            current["gpu"] = re.search(r"\bgpu=1\b", m[1]) is not None
        elif m := re.match(r"Job (\d+) has been submitted with SLURM jobid (\d+)", line):
            out.append((m[2], blocks[m[1]]["rule"], blocks[m[1]]["gpu"]))
    return out


@pytest.fixture(scope="module")
def ci(tmp_path_factory, workflow_snapshot) -> dict:
    out = tmp_path_factory.mktemp("slurm-ci")
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": f"{workflow_snapshot / 'src'}" + (f":{path}" if path else ""),
    }
    start = time.monotonic()
    run = subprocess.run(
        [str(workflow_snapshot / ".ci/slurm/run-test-config.sh"), str(out)],
        cwd=workflow_snapshot,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    wall = time.monotonic() - start
    print(
        f"\nSLURM CI run: {wall:.0f} s wall (install, start, workflow and time-limit check, stop)"
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    jobs = scontrol_jobs((out / "jobs.txt").read_text())
    log = (out / "snakemake.log").read_text()
    probe: dict[str, list[dict]] = {}
    for line in (out / "probe.jsonl").read_text().splitlines():
        record = json.loads(line)
        probe.setdefault(record["SLURM_JOB_ID"], []).append(record)
    return {
        "out": out,
        "wall_s": wall,
        "log": log,
        "timelimit_log": (out / "timelimit.log").read_text(),
        "jobs": jobs,
        "submitted": submissions(log),
        "probe": probe,
    }


def test_the_profile_is_found_by_name_and_the_run_completes(ci, record_property):
    record_property("slurm_wall_seconds", round(ci["wall_s"]))
    assert "Using profile slurm for setting default command line arguments" in ci["log"]
    assert re.search(r"(\d+) of \1 steps \(100%\) done", ci["log"])


def test_every_job_went_through_sbatch(ci):
    submitted = Counter(rule for _, rule, _ in ci["submitted"])
    # every planned job but the local `all`, plus the resubmission of the job that failed once
    assert submitted == planned_counts(ci["log"]) - Counter(all=1) + Counter(summarize_saes=1)
    states = Counter()
    for slurm_id, rule, _ in ci["submitted"]:
        job = ci["jobs"][slurm_id]
        assert comment_rule(job) == rule, job
        states[rule, job["JobState"]] += 1
        # the stage process ran inside this SLURM job (pid namespace aside, it saw its id)
        assert [p["SLURM_JOB_ID"] for p in ci["probe"][slurm_id]] == [slurm_id]
    assert {state for _, state in states} == {"COMPLETED", "FAILED"}
    assert [key for key in states if key[1] == "FAILED"] == [("summarize_saes", "FAILED")]
    assert states["summarize_saes", "FAILED"] == states["summarize_saes", "COMPLETED"] == 1


def test_gpu_rules_get_a_fake_gpu_and_the_others_none(ci):
    gpu_rules = {rule for _, rule, gpu in ci["submitted"] if gpu}
    assert {"train_sae", "evaluate_sae"} <= gpu_rules
    assert {rule for _, rule, gpu in ci["submitted"] if not gpu} >= {"tokenize", "summarize_saes"}
    for slurm_id, _, gpu in ci["submitted"]:
        job, (process,) = ci["jobs"][slurm_id], ci["probe"][slurm_id]
        if gpu:  # --gpus=1 on the gpu partition, chosen by the plugin from partitions.yaml
            assert job["Partition"] == "gpu" and job["TresPerJob"] == "gres:gpu:1", job
            assert process["CUDA_VISIBLE_DEVICES"] in ("0", "1"), process
            assert process["SLURM_JOB_PARTITION"] == "gpu"
        else:
            assert job["Partition"] == "debug" and "gpu" not in job.get("TresPerJob", ""), job
            assert process["CUDA_VISIBLE_DEVICES"] is None, process


def test_a_transient_failure_is_retried(ci):
    assert "injected transient failure of saeflow.sae_eval summarize" in ci["log"]
    assert "Trying to restart job" in ci["log"]
    retried = [slurm_id for slurm_id, rule, _ in ci["submitted"] if rule == "summarize_saes"]
    assert [ci["jobs"][i]["JobState"] for i in retried] == ["FAILED", "COMPLETED"]


def test_a_job_past_its_time_limit_says_so(ci):
    (job,) = [j for j in ci["jobs"].values() if f"{ci['out']}/timelimit/" in j["StdOut"]]
    assert comment_rule(job) == "convert_model"
    assert job["JobState"] == "TIMEOUT" and job["TimeLimit"] == "00:01:00"
    assert "SLURM status is: 'TIMEOUT'" in ci["timelimit_log"]
    assert "DUE TO TIME LIMIT" in ci["timelimit_log"]  # SLURM's own line, from the job's log


def test_results_equal_a_local_run(ci, clean_run):
    """Determinism across executors: the SLURM run and a local run (``clean_run``) write
    byte-identical tables and SAEs, and the same set of plots."""
    results = ci["out"] / "results"
    tables = sorted(p.relative_to(clean_run) for p in clean_run.glob("tables/*.csv"))
    saes = sorted(
        p.relative_to(clean_run) for p in clean_run.glob("saes/*/sae_weights.safetensors")
    )
    assert tables and saes
    for path in tables + saes:
        if path.as_posix() in TIMED_TABLES:  # wall times differ; every other column must not
            drop = TIMED_TABLES[path.as_posix()]
            slurm, local = (pd.read_csv(r / path).drop(columns=drop) for r in (results, clean_run))
            pd.testing.assert_frame_equal(slurm, local, check_exact=True, obj=str(path))
            continue
        assert (results / path).read_bytes() == (clean_run / path).read_bytes(), path
    assert sorted(p.name for p in results.glob("plots/**/*.pdf")) == sorted(
        p.name for p in clean_run.glob("plots/**/*.pdf")
    )
