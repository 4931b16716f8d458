"""Snakemake reruns exactly what is stale: real dry runs against a finished run of config/test.yaml.

Every case asserts the exact set of jobs (rule and wildcards) that a dry run plans, after one change
to the finished run (``clean_run``, shared with other modules and never modified here). How a change
reaches the jobs:

- config values reach their rules through ``params:``, so Snakemake's params trigger reruns the jobs
  that use them;
- code is tracked by ``params.code``, a content hash of the saeflow modules each rule lists
  (``code_version`` in workflow/rules/common.smk); modules no rule lists are not tracked;
- a touched input under Snakemake's ``--max-checksum-file-size`` (1 MB by default) is compared by
  checksum, so a new mtime alone reruns nothing. Larger files (the activations) are judged by
  mtime: touching one reruns the jobs that read it.
"""

import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from saeflow.config import sae_table

pytestmark = pytest.mark.integration

# Rules above SAE evaluation: a change to evaluation must not reach them.
UPSTREAM_RULES = {"convert_model", "tokenize", "cache_activations_smollm2", "lm_loss", "train_sae"}

Job = tuple[str, frozenset[tuple[str, str]]]
JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")
STATS_ROW = re.compile(r"^(\w+)\s+(\d+)$")


def job(rule: str, **wildcards: str) -> Job:
    return rule, frozenset(wildcards.items())


def planned_jobs(output: str) -> list[Job]:
    """The jobs a dry run lists, checked against its "Job stats" table."""
    jobs: list[Job] = []
    rule, wildcards = None, {}
    for line in output.splitlines() + [""]:
        if rule is not None and not line.startswith(" "):
            jobs.append((rule, frozenset(wildcards.items())))
            rule, wildcards = None, {}
        if match := JOB_HEADER.match(line):
            rule = match.group(1)
        elif rule is not None and line.strip().startswith("wildcards:"):
            pairs = line.split(":", 1)[1].split(",")
            wildcards = dict(pair.strip().split("=", 1) for pair in pairs)
    stats = {}
    if "Job stats:" in output:
        table = output.split("Job stats:", 1)[1].split("total", 1)[0]
        stats = {m[1]: int(m[2]) for row in table.splitlines() if (m := STATS_ROW.match(row))}
    assert stats == {r: [j[0] for j in jobs].count(r) for r in {j[0] for j in jobs}}, output
    return jobs


def dry_run(snakemake, workdir: Path, *args: str, reason: str = "", **kwargs) -> list[Job]:
    """The jobs a dry run plans; ``reason`` must appear among its reasons."""
    run = snakemake(workdir, "-n", *args, **kwargs)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert reason in run.stdout, run.stdout[-3000:]
    jobs = planned_jobs(run.stdout + run.stderr)
    print(f"\ndry run {' '.join(args)}: {dict(Counter(rule for rule, _ in jobs))}")
    return jobs


def all_saes(config_path: Path) -> list[str]:
    """Ids of every SAE a config declares (families expanded as the workflow does)."""
    return sorted(sae_table(yaml.safe_load(config_path.read_text())))


@pytest.fixture
def test_config(workflow_snapshot: Path) -> Path:
    """config/test.yaml as the finished run saw it."""
    return workflow_snapshot / "config/test.yaml"


@pytest.fixture
def eval_corpus(test_config: Path) -> str:
    return yaml.safe_load(test_config.read_text())["evaluation"]["corpus"]


def family_saes(config_path: Path, family: str) -> list[str]:
    table = sae_table(yaml.safe_load(config_path.read_text()))
    return sorted(i for i, sae in table.items() if sae.get("family") == family)


def config_with(tmp_path: Path, snapshot: Path, change) -> Path:
    """config/test.yaml with ``change(config)`` applied, written to tmp_path."""
    config = yaml.safe_load((snapshot / "config/test.yaml").read_text())
    change(config)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_finished_run_has_nothing_to_do(snakemake, clean_run):
    run = snakemake(clean_run, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr
    assert planned_jobs(run.stdout + run.stderr) == []


def test_one_sae_hyperparameter_reruns_that_sae_and_what_uses_it(
    snakemake, clean_run, workflow_snapshot, tmp_path, eval_corpus
):
    """The learning rate of the resid2_relu family changes. That reruns its SAEs' training and
    evaluation, the tables that use them, and nothing else. "Nothing else" is checked against what
    Snakemake plans when it is told to redo exactly those trainings (--forcerun on their outputs):
    the same jobs, so no other SAE, no caching."""

    def change(config):
        config["sae_families"]["resid2_relu"]["lr"] = 5e-4

    changed = config_with(tmp_path, workflow_snapshot, change)
    family = family_saes(changed, "resid2_relu")
    jobs = Counter(dry_run(snakemake, clean_run, configfile=changed))
    assert {j for j in jobs if j[0] in ("train_sae", "evaluate_sae")} == {
        job("train_sae", sae_id=sae) for sae in family
    } | {job("evaluate_sae", sae_id=sae, corpus=eval_corpus) for sae in family}
    assert job("summarize_saes") in jobs
    forced = [f"saes/{sae}/cfg.json" for sae in family]
    assert jobs == Counter(dry_run(snakemake, clean_run, "--forcerun", *forced))


def test_a_plotting_option_reruns_only_its_output(
    snakemake, clean_run, workflow_snapshot, tmp_path, eval_corpus
):
    """A figure's size redraws that figure and nothing else. Configs without figures use
    evaluation.downstream_seqs instead, the option nearest the leaves there: it reruns every
    evaluation and what reads evaluations, and nothing upstream."""
    config = yaml.safe_load((workflow_snapshot / "config/test.yaml").read_text())
    if "figure4" in config.get("figures", {}):
        figure = "figure4"  # the width x k heat map of plot_dark_matter

        def change(config):
            config["figures"][figure]["width"] += 1.0

        changed = config_with(tmp_path, workflow_snapshot, change)
        jobs = dry_run(snakemake, clean_run, configfile=changed)
        assert Counter(jobs) == Counter(
            [job("plot_dark_matter", figure=figure.removeprefix("figure")), job("all")]
        )
        return

    def change(config):
        config["evaluation"]["downstream_seqs"] = 2

    changed = config_with(tmp_path, workflow_snapshot, change)
    jobs = Counter(dry_run(snakemake, clean_run, configfile=changed))
    evaluations = {job("evaluate_sae", sae_id=sae, corpus=eval_corpus) for sae in all_saes(changed)}
    assert {j for j in jobs if j[0] == "evaluate_sae"} == evaluations
    assert jobs == Counter(dry_run(snakemake, clean_run, "--forcerun", "evaluate_sae"))


def test_editing_a_stage_module_reruns_that_stage(
    snakemake, clean_run, workflow_copy, test_config, eval_corpus
):
    """Code is tracked through params.code (code_version in workflow/rules/common.smk)."""
    src = workflow_copy / "src/saeflow"

    # a module that no rule lists (the Python API for reading results) is not tracked
    with (src / "results.py").open("a") as f:
        f.write("\n# an edit that no job depends on\n")
    assert dry_run(snakemake, clean_run, cwd=workflow_copy) == []

    # any byte of a listed module counts, even a comment: sae_eval.py is the module of
    # evaluate_sae and summarize_saes, so their jobs rerun, and what reads their outputs
    with (src / "sae_eval.py").open("a") as f:
        f.write("\n# an edit to the evaluation stage\n")
    jobs = Counter(dry_run(snakemake, clean_run, cwd=workflow_copy, reason="Params have changed"))
    evaluations = {
        job("evaluate_sae", sae_id=sae, corpus=eval_corpus) for sae in all_saes(test_config)
    }
    assert {j for j in jobs if j[0] == "evaluate_sae"} == evaluations
    assert job("summarize_saes") in jobs
    assert not {j for j in jobs if j[0] in UPSTREAM_RULES}
    forced = dry_run(snakemake, clean_run, "--forcerun", "evaluate_sae", "summarize_saes")
    assert jobs == Counter(forced)


def test_touching_files_without_changing_them_reruns_nothing(
    snakemake, clean_run, workflow_copy, tmp_path, test_config, eval_corpus
):
    """Touches an input of caching (the tokens), an SAE, its metrics and every stage module
    (in copies of the finished run and of the code)."""
    workdir = tmp_path / "run"
    shutil.copytree(clean_run, workdir, symlinks=True)
    future = time.time() + 60
    sae = all_saes(test_config)[0]
    touched = [
        workdir / "data/tokens/news.h5",
        workdir / f"saes/{sae}/cfg.json",
        workdir / f"sae_eval/{sae}/{eval_corpus}.metrics.json",
        *(workflow_copy / "src/saeflow").rglob("*.py"),
    ]
    for path in touched:
        assert path.stat().st_size < 1_000_000, f"{path} is over the checksum size limit"
        os.utime(path, (future, future))
    assert dry_run(snakemake, workdir, cwd=workflow_copy) == []
