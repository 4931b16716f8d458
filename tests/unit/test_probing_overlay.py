"""The sparse-probing paper overlays (Gemma-2-9B, Gemma-2-2B, Llama-3.1-8B): each DAG builds
offline with the expected jobs per rule, and every SAE id is one SAELens lists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate
from test_paper_overlay import (
    _job_counts,  # the same "Job stats" parser (tests/unit is on sys.path)
)

from saeflow.config import check, sae_table

REPO = Path(__file__).resolve().parents[2]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")

# Gemma-2-9B: 34 layer-20 SAEs + the 16k max-L0 SAEs of layers 9/31/41 = 37 SAEs, each imported,
# evaluated, encoded once and probed in the normal regime; the three regimes probe the layer-20
# 16k/131k/1m SAEs (3 x 3) and the layer-20 baseline only (4 + 3 baselines); the OOD regime the
# layer-20 baseline and the 131k L0 114 SAE (+1, +1); 5 figures.
# Gemma-2-2B: 5 Gemma Scope + 6 SAEBench layer-12 SAEs, normal regime only.
# Llama-3.1-8B: one Llama Scope SAE; 4 baseline layers + layer 16 in 3 regimes.
EXPECTED = {
    "probing.yaml": {"import_sae": 37, "evaluate_sae": 37, "probing_dataset_table": 1,
                     "probing_acts": 1, "probing_sae_acts": 37, "probing_baseline": 4 + 3 + 1,
                     "probing_sae_probes": 37 + 3 * 3 + 1, "probing_figure": 5},
    "probing_gemma2_2b.yaml": {"import_sae": 11, "evaluate_sae": 11, "probing_acts": 1,
                               "probing_sae_acts": 11, "probing_baseline": 1,
                               "probing_sae_probes": 11, "probing_figure": 1},
    "probing_llama3_8b.yaml": {"import_sae": 1, "evaluate_sae": 1, "probing_acts": 1,
                               "probing_sae_acts": 1, "probing_baseline": 4 + 3,
                               "probing_sae_probes": 1 + 3, "probing_figure": 4},
}


def _overlay(name: str) -> dict:
    config = yaml.safe_load((REPO / "config/paper" / name).read_text())
    validate(config, SCHEMA)
    return config


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_overlay_dag_builds_offline_with_the_expected_jobs(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", f"config/paper/{name}",
           "--config", f"workdir={tmp_path / 'wd'}", "--quiet", "rules", "--cores", "1"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = _job_counts(run.stdout + run.stderr)
    assert {rule: counts.get(rule) for rule in EXPECTED[name]} == EXPECTED[name]
    assert "train_sae" not in counts and "convert_model" not in counts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_overlay_saes_are_listed_by_sae_lens(name: str) -> None:
    config = _overlay(name)
    check(config)  # every (release, sae_id) against SAELens's bundled pretrained_saes.yaml
    table = sae_table(config)
    probed = set(config["probing"]["saes"]) | set(config["probing"].get("regime_saes") or [])
    assert probed <= set(table)
    assert all(table[i]["kind"] == "pretrained" for i in probed)


def test_gemma9b_regimes_use_the_papers_layer20_saes() -> None:
    config = _overlay("probing.yaml")
    table = sae_table(config)
    assert sorted(table[i]["sae_id"] for i in config["probing"]["regime_saes"]) == [
        "layer_20/width_131k/average_l0_276", "layer_20/width_16k/average_l0_408",
        "layer_20/width_1m/average_l0_193"]
    assert config["probing"]["regime_sites"] == ["blocks.20.hook_resid_post"]
    layers = sorted(int(s.split(".")[1]) for s in config["probing"]["sites"])
    assert layers == [9, 20, 31, 41]
