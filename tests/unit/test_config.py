"""The schema and the cross-reference checks reject bad configs, naming the key."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from saeflow.config import ConfigError, check, sae_table, sites_to_cache

REPO = Path(__file__).resolve().parents[2]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")
CONFIGS = [REPO / "config/config.yaml", REPO / "config/test.yaml"]


def _load(path=CONFIGS[0]):
    config = yaml.safe_load(Path(path).read_text())
    validate(config, SCHEMA)
    return config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = _load(path)
    check(config)
    assert sae_table(config)


def test_schema_fills_defaults():
    config = _load()
    assert config["corpora"]["news"]["prepend_bos"] is True
    assert config["sae_families"]["resid6_topk"]["seed"] == 0


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["activations"].update(bogus=1), "bogus"),
        (lambda c: c["sae_families"]["resid6_topk"].update(widht=[3]), "widht"),
        (lambda c: c["models"]["smollm2"].update(dtype="float8"), "float8"),
        (lambda c: c["sae_families"]["resid6_topk"].update(site="blocks.3.hook_nothing"),
         "blocks.3.hook_nothing"),
        (lambda c: c["corpora"]["news"].update(n_seq=0), "n_seq"),
        (lambda c: c.pop("evaluation"), "evaluation"),
    ],
)
def test_schema_rejects_bad_values_naming_them(mutate, needle):
    config = yaml.safe_load(CONFIGS[0].read_text())
    mutate(config)
    with pytest.raises(WorkflowError, match=needle):
        validate(config, SCHEMA)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["sae_families"]["resid6_topk"].update(site="blocks.30.hook_resid_post"),
         r"sae_families\.resid6_topk\.site: layer 30 .* 30 layers"),
        (lambda c: c["sae_families"]["resid6_topk"].update(model="gpt5"),
         r"sae_families\.resid6_topk\.model: 'gpt5' is not declared"),
        (lambda c: c["evaluation"].update(corpus="nope"), r"evaluation\.corpus: 'nope'"),
        (lambda c: c["corpora"]["news"].update(tokenizer="llama"), r"corpora\.news\.tokenizer"),
        (lambda c: c["models"]["smollm2"]["sites"].append("blocks.99.hook_mlp_out"),
         r"models\.smollm2\.sites\[2\]: layer 99"),
    ],
)
def test_check_rejects_inconsistent_configs_naming_the_key(mutate, needle):
    config = _load()
    mutate(config)
    with pytest.raises(ConfigError, match=needle):
        check(config)


def test_families_expand_to_targets_and_sites():
    config = _load()
    table = sae_table(config)
    topk = sorted(i for i, s in table.items() if s["family"] == "resid6_topk")
    assert len(topk) == 6  # 3 widths x 2 k
    assert sites_to_cache(config, "smollm2") == [  # blocks.5: Figure 10b's previous layer
        "blocks.5.hook_resid_post", "blocks.6.hook_attn_out", "blocks.6.hook_mlp_out",
        "blocks.6.hook_resid_post"]
    pretrained = copy.deepcopy(config)
    pretrained["pretrained_saes"] = {"mine": {"model": "smollm2", "site": "blocks.4.hook_resid_post",
                                              "path": "somewhere"}}
    assert sae_table(pretrained)["mine"]["kind"] == "pretrained"
    assert "blocks.4.hook_resid_post" in sites_to_cache(pretrained, "smollm2")
