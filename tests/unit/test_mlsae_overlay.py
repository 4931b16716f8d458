"""The MLSAE paper overlay and config section: the DAG builds offline with the expected jobs,
and bad sections fail with a message naming the key."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from saeflow.mlsae.config import MLSAEConfigError, layers, mlsae_table

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "config/paper/mlsae.yaml"
OVERLAY_160M = REPO / "config/paper/mlsae-pythia160m.yaml"
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")

# 3 expansion factors x 3 k trained, the 9 released tim-lawson MLSAEs imported, all 18
# evaluated; every layer of the train and eval corpora cached once each; one single-layer
# baseline (x64-k32 at layer 4, as the released one) trained, evaluated and compared.
EXPECTED_JOBS = {
    "tokenize": 2,
    "cache_mlsae_activations": 2,
    "train_mlsae": 10,
    "import_mlsae": 9,
    "evaluate_mlsae": 18,
    "evaluate_mlsae_baseline": 1,
    "mlsae_vs_single_layer": 1,
    "mlsae_similarities": 1,
    "mlsae_tables": 1,
}
# Pythia-160m: x64-k32 trained and the released one imported, both evaluated; one baseline.
EXPECTED_JOBS_160M = {
    "tokenize": 2,
    "cache_mlsae_activations": 2,
    "train_mlsae": 2,
    "import_mlsae": 1,
    "evaluate_mlsae": 2,
    "evaluate_mlsae_baseline": 1,
    "mlsae_vs_single_layer": 1,
    "mlsae_similarities": 1,
    "mlsae_tables": 1,
}


def _overlay(path: Path = OVERLAY) -> dict:
    config = yaml.safe_load(path.read_text())
    validate(config, SCHEMA)
    return config


def _job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"\s*(\S+)\s+(\d+)\s*", line)
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


@pytest.mark.parametrize(("overlay", "expected"), [(OVERLAY, EXPECTED_JOBS),
                                                   (OVERLAY_160M, EXPECTED_JOBS_160M)])
def test_overlay_dag_builds_offline_with_the_expected_jobs(tmp_path: Path, overlay: Path,
                                                           expected: dict[str, int]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", str(overlay),
           "--config", f"workdir={tmp_path / 'wd'}", "--quiet", "rules", "--cores", "1"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = _job_counts(run.stdout + run.stderr)
    for rule, count in expected.items():
        assert counts.get(rule) == count, (rule, counts)
    assert "convert_model" not in counts  # a hub model is not converted


def test_overlay_sweep_is_the_papers() -> None:
    config = _overlay()
    table = mlsae_table(config)
    trained = sorted(i for i, s in table.items() if s["kind"] == "trained")
    assert trained == sorted(f"mlsae-x{r}-k{k}" for r in (32, 64, 128) for k in (16, 32, 64))
    repos = sorted(s["repo"] for s in table.values() if s["kind"] == "pretrained")
    assert repos == sorted(f"tim-lawson/mlsae-pythia-70m-deduped-x{r}-k{k}"
                           for r in (32, 64, 128) for k in (16, 32, 64))
    assert layers(config) == list(range(6))


def test_pythia160m_overlay_reads_its_12_layers() -> None:
    config = _overlay(OVERLAY_160M)
    table = mlsae_table(config)
    assert sorted(table) == ["lawson-160m-x64-k32", "mlsae-x64-k32"]
    assert table["lawson-160m-x64-k32"]["repo"] == "tim-lawson/mlsae-pythia-160m-deduped-x64-k32"
    assert layers(config) == list(range(12))
    assert config["models"]["pythia160m"]["path"] == "EleutherAI/pythia-160m-deduped"


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["mlsae"].update(corpus="nope"), "mlsae.corpus: 'nope'"),
    (lambda c: c["mlsae"].update(model="nope"), "mlsae.model: 'nope'"),
    (lambda c: c["mlsae"].update(first_layer=4, last_layer=2), "first_layer (4) is after"),
    (lambda c: c["mlsae"]["pretrained"].update(bad={"repo": "a", "path": "b"}),
     "mlsae.pretrained.bad: give exactly one"),
])
def test_bad_sections_name_their_key(mutate, needle: str) -> None:
    config = copy.deepcopy(_overlay())
    mutate(config)
    with pytest.raises(MLSAEConfigError, match=re.escape(needle)):
        mlsae_table(config)
        layers(config)


def test_layers_past_the_packaged_models_depth_are_rejected() -> None:
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    validate(config, SCHEMA)
    config["mlsae"]["last_layer"] = 30
    with pytest.raises(MLSAEConfigError, match=r"0\.\.30 is not a range .* layers 0\.\.29"):
        layers(config)
    config["mlsae"]["last_layer"] = None
    assert layers(config) == list(range(30))
