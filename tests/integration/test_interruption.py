"""Interrupted runs: SIGKILL mid-job, then `snakemake --unlock` and `--rerun-incomplete`.

Snakemake builds one TopK SAE of config/test.yaml from an empty working directory, so it runs
model conversion, tokenization, activation caching and training. The run is killed twice with
SIGKILL, sent to Snakemake and to every process it started, which is what a crashed node or a
lost session does. The first kill comes while the caching job is partway through writing its
activations, the second while the SAE trains past its first checkpoint. After each kill, no final
output of the killed job exists, because outputs are written under temporary names and renamed
when complete. The repaired run finishes: caching starts over, and training resumes from its
checkpoint (its log says so). The activations and the SAE equal those of an uninterrupted run
(``clean_run``) bit for bit, with the same seeds, on CPU, with the same thread count.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from saeflow import h5io
from saeflow.config import sae_table

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / ".ci/slurm/probe"  # sitecustomize.py with fault injection, see its docstring
WAIT_S = 900


def start_run(workflow_snapshot: Path, workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    """Start `snakemake -c2` on the test config in its own session (so it can be killed whole)."""
    cmd = [sys.executable, "-m", "snakemake", "-c2", *args, "--configfile", "config/test.yaml"]
    cmd += ["--config", f"workdir={workdir}"]  # last: --configfile and --config take several values
    env = {**os.environ, "PYTHONPATH": str(workflow_snapshot / "src")}
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            cwd=workflow_snapshot,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    """SIGKILL Snakemake and all its descendants as soon as ``ready()``."""
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s"
        time.sleep(0.005)
    family = [psutil.Process(proc.pid)]
    family += family[0].children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:  # anything that left the session
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def caching_tmp_files(workdir: Path) -> list[Path]:
    """Half-written activation files: atomic_path's `.{name}.tmp-{pid}` siblings."""
    return sorted((workdir / "acts").glob("*/*/.blocks.*.h5.tmp-*"))


def caching_partway(workdir: Path) -> bool:
    """A caching job has written activations (over 1 MB, a batch or more) but not finished."""
    return any(p.stat().st_size > 1_000_000 for p in caching_tmp_files(workdir) if p.exists())


def without_timings(value):
    """A JSON value without throughput and duration fields (cfg.json records tokens_per_s)."""
    if isinstance(value, dict):
        return {
            key: without_timings(item)
            for key, item in value.items()
            if not key.endswith(("_per_s", "_seconds", "_time"))
        }
    return value


@pytest.fixture(scope="module")
def topk(workflow_snapshot: Path) -> dict:
    """The first TopK SAE of the test config: its id and the activations it trains on."""
    table = sae_table(yaml.safe_load((workflow_snapshot / "config/test.yaml").read_text()))
    sae_id = min(i for i, sae in table.items() if sae.get("architecture") == "topk")
    sae = table[sae_id]
    return {"id": sae_id, "acts": Path("acts", sae["model"], sae["corpus"])}


@pytest.fixture(scope="module")
def repaired(tmp_path_factory, workflow_snapshot, snakemake, topk) -> dict:
    """Kill during caching, kill during training, repair; what each kill left behind."""
    base = tmp_path_factory.mktemp("interrupted")
    workdir = base / "results"
    target = f"saes/{topk['id']}/cfg.json"
    checkpoint = workdir / "checkpoints" / topk["id"] / "topk_checkpoint.pt"
    seen = {"workdir": workdir}

    run = start_run(workflow_snapshot, workdir, base / "run1.log", target)
    kill_when(run, lambda: caching_partway(workdir), "caching job partway through its output")
    seen["caching_tmp"] = caching_tmp_files(workdir)
    seen["acts_after_kill"] = sorted((workdir / topk["acts"]).glob("*.h5"))
    seen["dry_run_after_kill"] = snakemake(workdir, "-n", target)

    assert snakemake(workdir, "--unlock").returncode == 0
    run = start_run(workflow_snapshot, workdir, base / "run2.log", target, "--rerun-incomplete")
    kill_when(run, checkpoint.exists, "TopK checkpoint")
    seen["sae_after_kill"] = sorted((workdir / "saes" / topk["id"]).glob("*"))

    assert snakemake(workdir, "--unlock").returncode == 0
    final = snakemake(workdir, target, "--rerun-incomplete")
    assert final.returncode == 0, final.stdout[-5000:] + final.stderr[-5000:]
    seen["caching_tmp_after_repair"] = caching_tmp_files(workdir)
    return seen


def test_a_killed_caching_job_leaves_no_finished_looking_file(repaired):
    assert repaired["caching_tmp"], "the kill should have caught a half-written file"
    assert repaired["acts_after_kill"] == []
    assert repaired["caching_tmp_after_repair"] == []  # the rerun cleared the killed job's litter
    dry_run = repaired["dry_run_after_kill"]
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    assert re.search(r"^cache_activations_\w+\s+1$", dry_run.stdout, re.MULTILINE), dry_run.stdout


def test_a_killed_training_job_leaves_no_sae_and_resumes(repaired, topk):
    assert repaired["sae_after_kill"] == []
    log = (repaired["workdir"] / f"logs/train_sae/{topk['id']}.log").read_text()
    assert re.search(r"resuming from the checkpoint at step [1-9]\d*", log), log[-2000:]


def test_repaired_outputs_equal_an_uninterrupted_run(repaired, clean_run, topk):
    workdir = repaired["workdir"]
    acts = sorted((clean_run / topk["acts"]).glob("blocks.*.h5"))
    assert acts
    for path in acts:
        with h5io.H5File(path) as want, h5io.H5File(workdir / path.relative_to(clean_run)) as got:
            assert sorted(got) == sorted(want)
            for name in map(str, want):
                np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=f"{path}:{name}")
    sae = Path("saes", topk["id"])
    weights = sae / "sae_weights.safetensors"
    assert (workdir / weights).read_bytes() == (clean_run / weights).read_bytes()
    cfg = sae / "cfg.json"
    got, want = (json.loads((d / cfg).read_text()) for d in (workdir, clean_run))
    assert without_timings(got) == without_timings(want)


def test_a_transient_failure_is_retried(repaired, snakemake, workflow_snapshot):
    """The local counterpart of the SLURM check: `--retries` resubmits a job that failed once."""
    workdir = repaired["workdir"]
    marker = workdir.parent / "fail-once.marker"
    env = {
        "PYTHONPATH": f"{PROBE}:{workflow_snapshot / 'src'}",
        "SAEFLOW_CI_FAIL_ONCE": f"data={marker}",
    }
    tokens = "data/tokens/news.h5"
    run = snakemake(workdir, tokens, "--forcerun", "tokenize", "--retries", "1", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert marker.exists()
    assert "Trying to restart job" in run.stdout + run.stderr
