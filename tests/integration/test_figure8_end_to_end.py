"""Figure 8 end to end: error SAEs, latent examples, LLM scoring by the real local
`transformers serve`, the table and the plot, in the shared run of config/test.yaml.

``clean_run`` (tests/integration/conftest.py) is one ``snakemake -c2`` of the test config's
default target from an empty working directory; plots/figure8.pdf is part of it whenever
``autointerp.base_sae`` is set, so this module adds no second pipeline run to CI.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from saeflow.h5io import H5File

pytestmark = pytest.mark.integration

COMPONENTS = ("linear", "nonlinear")


@pytest.fixture
def ai(workflow_snapshot: Path) -> dict:
    """The autointerp section of config/test.yaml as the finished run saw it."""
    return yaml.safe_load((workflow_snapshot / "config/test.yaml").read_text())["autointerp"]


def sae_ids(ai: dict) -> list[str]:
    return [f"{ai['base_sae']}-{c}_error" for c in COMPONENTS]


def test_figure_and_table_exist(clean_run):
    pdf = clean_run / "plots/figure8.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    table = pd.read_csv(clean_run / "tables/figure8.csv")
    assert sorted(set(table.dictionary)) == ["linear", "nonlinear"]
    detection = table[table.scorer == "detection"]
    assert len(detection) == 2 * 11
    assert ((detection.value >= 0) & (detection.value <= 1) | detection.value.isna()).all()
    assert (detection.k <= detection.n).all()


def test_error_saes_record_their_base_and_component(clean_run, ai):
    for sae_id, component in zip(sae_ids(ai), COMPONENTS):
        cfg = json.loads((clean_run / f"saes/{sae_id}/cfg.json").read_text())
        assert cfg["d_sae"] == ai["width"] and cfg["k"] == ai["k"]
        source = cfg["metadata"]["saeflow_error_sae"]
        assert source["base_sae_id"] == ai["base_sae"] and source["component"] == component
        assert (clean_run / f"saes/{sae_id}/sae_weights.safetensors").is_file()


def test_summaries_count_every_request(clean_run, ai):
    for sae_id in sae_ids(ai):
        folder = clean_run / f"autointerp/{sae_id}"
        summary = json.loads((folder / "summary.json").read_text())
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        with H5File(folder / "examples.h5") as h5:
            n_latents, kind = len(h5["latents"]), h5["kind"][:]
        assert summary["latents"] == len(records) == n_latents
        assert 1 <= n_latents <= ai["n_latents"]
        # one explanation per latent plus each scorer's prompts; each call is answered from the
        # cache or sent (retries are extra attempts of a sent call)
        calls = sum(1 + r["detection"]["prompts"] + r["fuzzing"]["prompts"] for r in records)
        assert summary["calls"] == calls
        assert summary["requests"] - summary["retries"] + summary["cache_hits"] == calls
        assert summary["failures"] <= ai["score"].get("max_failed_fraction", 0.1) * calls
        per_prompt = ai["score"]["examples_per_prompt"]
        for row, record in enumerate(records):
            if record["explanation"] is None:
                continue
            tested = np.flatnonzero(np.isin(kind[row], (2, 3)))
            assert sorted(record["detection"]["example"]) == tested.tolist()
            assert record["detection"]["prompts"] == math.ceil(len(tested) / per_prompt)
        assert (folder / "llm_cache.jsonl").is_file()  # kept beside the outputs, not one of them


def test_a_second_run_has_nothing_to_do(snakemake, clean_run):
    run = snakemake(clean_run, "-n", "plots/figure8.pdf")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr
