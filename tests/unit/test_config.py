"""The schema and the cross-reference checks reject bad configs, naming the key."""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from saeflow.config import (
    ConfigError,
    ConfigWarning,
    check,
    check_config_files,
    sae_table,
    sites_to_cache,
)

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
        (lambda c: c["sae_families"]["resid6_relu"].update(normalize_activations="l2"), "'l2'"),
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


def _topk(**over):
    family = {"model": "smollm2", "corpus": "news", "site": "blocks.6.hook_resid_post",
              "architecture": "topk", "widths": [64], "k": [8], "tokens": 4096,
              "batch_size": 1024}
    return {**family, **over}


def _add_family(config, name="extra", **over):
    config["sae_families"][name] = _topk(**over)
    return config


def _expansion_family(config):
    config["sae_families"]["extra"] = {**_topk(k=[200]), "expansion_factors": [0.25]}
    del config["sae_families"]["extra"]["widths"]  # 0.25 x d_model 576 = 144 latents


def _colliding_ids(config):
    config["sae_families"]["a"] = _topk()  # a-w64-k8
    config["pretrained_saes"] = {"a-w64-k8": {"model": "smollm2", "path": "x",
                                              "site": "blocks.6.hook_resid_post"}}


def _colliding_error_sae(config):
    config["pretrained_saes"] = {"resid6_topk-w2304-k32-linear_error": {
        "model": "smollm2", "site": "blocks.6.hook_resid_post", "path": "x"}}


def _pretrained(**over):
    sae = {"model": "smollm2", "site": "blocks.6.hook_resid_post",
           "release": "gemma-scope-2b-pt-res", "sae_id": "layer_12/width_16k/average_l0_82"}
    return {"gs": {**sae, **over}}


# Each bad value of issue 14 stops before any job, naming the key, the value and the expectation.
@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: _add_family(c, k=[65]),
         r"sae_families\.extra\.k: 65 active latents is more than the width 64; expected k <="),
        (_expansion_family, r"sae_families\.extra\.k: 200 .* the width 144"),
        (lambda c: c["sae_families"]["resid6_topk"].update(lr=-1e-4),
         r"sae_families\.resid6_topk\.lr: -0\.0001; expected a positive learning rate"),
        (lambda c: c["sae_families"]["resid6_relu"].update(batch_size=400000),
         (r"sae_families\.resid6_relu\.batch_size: 400000 tokens per step is more than "
         r"sae_families\.resid6_relu\.tokens \(300000\)")),
        (lambda c: c["corpora"]["news_eval"].update(n_seq=20000),
         (r"corpora\.news_eval\.n_seq: 20000 sequences of 127 tokens need 2,540,000 tokens; the "
         r"'eval' split .* at most 1,261,\d+ tokens; expected n_seq <= 9,")),
        (_colliding_ids,
         r"pretrained_saes\.a-w64-k8: SAE id 'a-w64-k8' is also declared by sae_families\.a"),
        (lambda c: c.update(pretrained_saes=_pretrained(release="gemma-scope-2b-pt-rez")),
         (r"pretrained_saes\.gs\.release: 'gemma-scope-2b-pt-rez' is not a release in SAELens's "
         r"directory .* close names: gemma-scope-2b-pt-res")),
        (lambda c: c.update(pretrained_saes=_pretrained(sae_id="layer_12/width_16k/average_l0_8")),
         (r"pretrained_saes\.gs\.sae_id: 'layer_12/width_16k/average_l0_8' is not an SAE of "
         r"release 'gemma-scope-2b-pt-res'")),
        (lambda c: c["models"]["smollm2"].update(path="HuggingFaceTB/NoSuchModel-1M"),
         (r"models\.smollm2\.path: 'HuggingFaceTB/NoSuchModel-1M' is a hub id that is not in the "
         r"local Hugging Face cache, and models\.smollm2\.allow_download is false")),
        (lambda c: c["models"]["smollm2"].update(path="./no/such/folder"),
         r"models\.smollm2\.path: '\./no/such/folder' is not a folder with a config\.json"),
    ],
    ids=["k>width", "k>expansion_width", "negative_lr", "batch>tokens", "split_too_small",
         "id_collision", "unknown_release", "unknown_release_sae_id", "hub_id_offline",
         "missing_local_model"],
)
def test_check_rejects_issue14_cases_naming_key_value_and_expectation(mutate, needle):
    config = _load()
    mutate(config)
    with pytest.raises(ConfigError, match=needle):
        check(config)


def test_pretrained_family_ids_cannot_collide_with_pretrained_saes():
    config = _load()
    config["pretrained_families"] = {"p": {
        "model": "smollm2", "site": "blocks.6.hook_resid_post", "release": "gemma-scope-2b-pt-res",
        "sae_id": "layer_12/width_{width}/average_l0_{l0}", "grid": {"16k": [82]}}}
    assert "p-w16k-l0-82" in sae_table(config)
    config["pretrained_saes"] = {"p-w16k-l0-82": {"model": "smollm2", "path": "x",
                                                  "site": "blocks.6.hook_resid_post"}}
    with pytest.raises(ConfigError, match=r"pretrained_saes\.p-w16k-l0-82: SAE id 'p-w16k-l0-82' "
                       r"is also declared by pretrained_families\.p"):
        check(config)


def test_known_pretrained_releases_pass_offline():
    config = _load()
    config["pretrained_saes"] = _pretrained()
    check(config)  # gemma-scope-2b-pt-res lists layer_12/width_16k/average_l0_82


def test_hub_id_with_downloads_allowed_but_hub_offline_warns(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _load()
    config["models"]["smollm2"].update(path="HuggingFaceTB/NoSuchModel-1M", allow_download=True)
    with pytest.warns(ConfigWarning, match=r"models\.smollm2\.path: .* HF_HUB_OFFLINE is set"):
        check(config)  # the model's layers are unknown offline, so the site checks pass


def test_evaluating_on_a_training_corpus_warns_in_sample():
    config = _load()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(config)  # the default evaluates on held-out documents: no warning
    config["evaluation"]["corpus"] = "news"
    with pytest.warns(ConfigWarning, match=r"evaluation\.corpus: 'news' is the training corpus "
                      r"of sae_families\.attn6_topk, .* is then in-sample"):
        check(config)
    config = _load()
    config["corpora"]["news_eval"]["split"] = "all"  # overlaps the train split's documents
    with pytest.warns(ConfigWarning, match=r"evaluation\.corpus: 'news_eval' can share documents"):
        check(config)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["evaluation"].update(downstream_seqs=300),
         r"evaluation\.downstream_seqs: 300 is more than the 256 sequences"),
        (lambda c: c["figures"]["figure11"].update(magnify_start=99),
         r"figures\.figure11\.magnify_start: 99 is not inside the window .*\(offsets 0\.\.99"),
        (lambda c: c["dark_matter"].update(window_start=32500),  # 12 tokens before the end
         r"figures\.figure11\.magnify_start: 85 .*\(offsets 0\.\.11"),
        (lambda c: c["dark_matter"].update(window_start=32512),
         r"dark_matter\.window_start: 32512 is past the 32512 evaluation tokens"),
        (lambda c: c["dark_matter"]["downstream_ce"].update(seqs=257),
         r"dark_matter\.downstream_ce\.seqs: 257 is more than the 256 sequences"),
        (lambda c: c["dark_matter"]["downstream_ce"].update(k_width=1000),
         (r"dark_matter\.downstream_ce\.k_width: 1000 is not a width of family 'resid6_topk'; "
         r"expected one of \[1152, 2304, 4608\]")),
        (lambda c: c["autointerp"].update(k=3000),
         r"autointerp\.k: 3000 active latents is more than autointerp\.width \(2304\)"),
        (lambda c: c["autointerp"].update(batch_size=2_000_000),
         r"autointerp\.batch_size: 2000000 tokens per step is more than autointerp\.tokens"),
        (lambda c: c["autointerp"].update(ctx_len=128),
         r"autointerp\.ctx_len: 128-token windows do not fit the 127 cached positions"),
        (_colliding_error_sae,
         r"autointerp\.base_sae: the error SAE id 'resid6_topk-w2304-k32-linear_error' is also"),
    ],
    ids=["downstream_seqs", "magnify_past_window", "magnify_past_clipped_window",
         "window_start", "downstream_ce_seqs", "k_width", "autointerp_k", "autointerp_batch",
         "autointerp_ctx_len", "error_sae_id"],
)
def test_check_rejects_stage_limits_hit_only_after_upstream_jobs(mutate, needle):
    config = _load()
    check(config)
    mutate(config)
    with pytest.raises(ConfigError, match=needle):
        check(config)


def test_examples_on_the_error_saes_training_corpus_warn():
    config = _load()
    config["autointerp"]["corpus"] = "news"
    with pytest.warns(ConfigWarning, match=r"autointerp\.corpus: 'news' is the training corpus "
                      r"of the error SAEs"):
        check(config)


def test_warmup_past_the_run_warns():
    config = _load()
    config["sae_families"]["resid6_topk"]["lr_warmup_steps"] = 977  # 1e6 // 1024 = 976 steps
    with pytest.warns(ConfigWarning, match=r"resid6_topk\.lr_warmup_steps: 977 .* 976 steps"):
        check(config)


def test_duplicate_yaml_keys_are_errors_naming_file_line_and_key(tmp_path):
    check_config_files(CONFIGS)  # the shipped configs repeat nothing
    text = CONFIGS[1].read_text().replace("  lm_loss: true\n", "  lm_loss: true\n  batch_size: 8\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["activations"]["batch_size"] == 8  # PyYAML: the last one wins
    line = text.splitlines().index("  batch_size: 8") + 1
    with pytest.raises(ConfigError, match=rf"dup\.yaml:{line}: key 'batch_size' is given twice "
                       r"\(first on line \d+\)"):
        check_config_files([path])


def test_snakemake_stops_on_a_duplicate_key_before_any_job(tmp_path):
    text = CONFIGS[1].read_text().replace("  lm_loss: true\n", "  lm_loss: true\n  batch_size: 8\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "--config",
           f"workdir={tmp_path / 'wd'}", "--cores", "1"]
    run = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=300, check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "key 'batch_size' is given twice" in out, out[-2000:]
    assert "Job stats" not in out and not (tmp_path / "wd").exists()
