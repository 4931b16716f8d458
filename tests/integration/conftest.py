"""Shared by the integration tests that need a finished run of config/test.yaml.

``clean_run`` is built once per session (several minutes on 2 cores) from ``workflow_snapshot``,
a copy of the workflow, the saeflow sources and the SLURM profile and scripts. Runs from the
snapshot execute the snapshot's code (its ``src`` goes first on PYTHONPATH), so tests can edit
modules there, and edits to the checkout while the tests run cannot make a finished run look stale
or different.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What a run reads, plus the SLURM profile link and the CI scripts (test_slurm runs them here).
SNAPSHOT_PARTS = ("Snakefile", "workflow", "config", "envs", "src", "slurm", ".ci")

Snakemake = Callable[..., subprocess.CompletedProcess]


def copy_workflow(src: Path, dest: Path) -> Path:
    """Copy the parts of a checkout that a run reads (no caches, no results)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake")
    for part in SNAPSHOT_PARTS:
        if (src / part).is_symlink():
            (dest / part).symlink_to(os.readlink(src / part))
        elif (src / part).is_dir():
            shutil.copytree(src / part, dest / part, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src / part, dest / part)
    return dest


def snakemake_command(
    workdir: Path, *args: str, configfile: Path | str = "config/test.yaml"
) -> list[str]:
    """``snakemake -c2`` on a config with ``workdir`` set. ``args`` (targets too) come first:
    --configfile and --config take several values, so a target after them would be read as one."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-c2",
        *args,
        "--configfile",
        str(configfile),
        "--config",
        f"workdir={workdir}",
    ]


def snapshot_env(snapshot: Path) -> dict[str, str]:
    """The environment for processes that must run the snapshot's saeflow."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(snapshot / "src") + (f":{path}" if path else "")}


@pytest.fixture(scope="session")
def workflow_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workflow(REPO, tmp_path_factory.mktemp("workflow-snapshot"))


@pytest.fixture
def workflow_copy(workflow_snapshot: Path, tmp_path: Path) -> Path:
    """A fresh copy of the snapshot for one test to edit; pass it to ``snakemake(..., cwd=)``."""
    return copy_workflow(workflow_snapshot, tmp_path / "workflow-copy")


@pytest.fixture(scope="session")
def snakemake(workflow_snapshot: Path) -> Snakemake:
    """Run snakemake in a workflow copy (default: the session snapshot) on a working directory."""

    def run(
        workdir: Path,
        *args: str,
        cwd: Path | None = None,
        configfile: Path | str = "config/test.yaml",
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        cwd = cwd or workflow_snapshot
        return subprocess.run(
            snakemake_command(workdir, *args, configfile=configfile),
            cwd=cwd,
            env={**snapshot_env(cwd), **(env or {})},
            capture_output=True,
            text=True,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory: pytest.TempPathFactory, snakemake: Snakemake) -> Path:
    """Working directory of one complete, uninterrupted run of config/test.yaml. Read it only."""
    workdir = tmp_path_factory.mktemp("clean-run")
    run = snakemake(workdir)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return workdir
