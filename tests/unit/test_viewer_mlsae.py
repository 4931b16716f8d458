"""The viewer's MLSAE views against a real uvicorn: examples per (latent, layer) from the feature
database, per-layer latent activations of a prompt and steering, each checked against the same
computation done here (a tiny random Llama with the packaged SmolLM2 tokenizer, a random MLSAE)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from viewer_server import viewer_server

from saeflow.analysis import store
from saeflow.mlsae.math import dense_codes, reconstruct
from saeflow.mlsae.trainer import MLSAETrainConfig, save_mlsae
from saeflow.models import load_tokenizer, resolve_site, site_activation
from saeflow.topk import TopKParams

D, M, K, LAYERS = 32, 48, 4, [0, 1]
TEXT = "The central bank raised interest rates on Tuesday."


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("viewer_mlsae")
    tokenizer = load_tokenizer("packaged")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    w = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    params = TopKParams(w.T.contiguous(), torch.zeros(M), w, torch.zeros(D))
    save_mlsae(root / "sae", params, MLSAETrainConfig(d_in=D, d_sae=M, k=K, layers=LAYERS,
                                                      total_tokens=1))
    rows = [{"idx": 7, "layer": layer, "rank": rank, "act": 3.0 - rank - layer, "token_id": 1,
             "token": "a", "token_ids": [1], "tokens": ["a"], "acts": [3.0 - rank - layer]}
            for layer in LAYERS for rank in range(2)]
    s = store.open_store(str(root / "features.sqlite"))
    s.load_layer_examples("tiny-mlsae", rows, {
        "sae_id": "tiny-mlsae", "d_sae": M, "layers": LAYERS, "sae_path": "sae",
        "model_path": "model"})
    s.close()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    return {"root": root, "model": model, "params": params, "ids": ids}


@pytest.fixture(scope="module")
def server(built: dict):
    with viewer_server(str(built["root"] / "features.sqlite"), "/api/mlsaes") as url:
        yield httpx.Client(base_url=url + "/api", timeout=120)


def _residuals(built: dict) -> torch.Tensor:
    got = {}
    hooks = [resolve_site(built["model"], f"blocks.{layer}.hook_resid_post")[0]
             .register_forward_hook(lambda _m, _i, out, layer=layer:
                                    got.__setitem__(layer, site_activation(out)))
             for layer in LAYERS]
    with torch.inference_mode():
        built["model"](built["ids"])
    for hook in hooks:
        hook.remove()
    return torch.stack([got[layer][0].float() for layer in LAYERS])


def test_listing_and_examples(server: httpx.Client) -> None:
    assert [m["name"] for m in server.get("/mlsaes").json()] == ["tiny-mlsae"]
    rows = server.get("/mlsaes/tiny-mlsae/features/7/examples").json()
    assert [(r["layer"], r["rank"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    one = server.get("/mlsaes/tiny-mlsae/features/7/examples", params={"layer": 1}).json()
    assert [r["act"] for r in one] == [2.0, 1.0]
    assert server.get("/mlsaes/tiny-mlsae/features/8/examples").json() == []


def test_latent_activations_match_the_mlsae_on_the_residuals(server: httpx.Client,
                                                              built: dict) -> None:
    x = _residuals(built)
    dense = dense_codes(reconstruct(built["params"], x, K)[1], M)  # (L, T, M)
    latent = int(dense.sum((0, 1)).argmax())
    res = server.post("/mlsaes/tiny-mlsae/prompt/latent-activations",
                      json={"text": TEXT, "latent": latent, "top": K}).json()
    assert len(res["tokens"]) == built["ids"].shape[1] and res["layers"] == LAYERS
    torch.testing.assert_close(torch.tensor(res["latent_acts"]), dense[:, :, latent],
                               atol=1e-4, rtol=1e-4)
    for li in range(len(LAYERS)):
        for p, active in enumerate(res["latents"][li]):
            for i, v in active:
                assert v == pytest.approx(float(dense[li, p, i]), rel=1e-4, abs=1e-5)
            assert len(active) == int((dense[li, p] > 0).sum())


def test_steering_changes_the_logits_as_adding_the_decoder_row(server: httpx.Client,
                                                                built: dict) -> None:
    body = {"text": TEXT, "latent": 5, "layer": 1, "factor": 0.0, "top": 3}
    assert server.post("/mlsaes/tiny-mlsae/prompt/logits-steer",
                       json=body).json()["max_abs_change"] < 1e-5
    res = server.post("/mlsaes/tiny-mlsae/prompt/logits-steer",
                      json={**body, "factor": 40.0}).json()
    direction = 40.0 * built["params"].W_dec[5]
    module = resolve_site(built["model"], "blocks.1.hook_resid_post")[0]
    with torch.inference_mode():
        clean = built["model"](built["ids"]).logits[0]
        hook = module.register_forward_hook(lambda _m, _i, out: (out[0] + direction, *out[1:])
                                            if isinstance(out, tuple) else out + direction)
        steered = built["model"](built["ids"]).logits[0]
        hook.remove()
    delta = steered - clean
    assert res["max_abs_change"] == pytest.approx(float(delta.abs().max()), rel=1e-3)
    last = res["positions"][-1]
    assert last["increase"][0][1] == pytest.approx(float(delta[-1].max()), rel=1e-3)
    assert last["decrease"][0][1] == pytest.approx(float(delta[-1].min()), rel=1e-3)


def test_logits_with_the_reconstruction_spliced_in(server: httpx.Client, built: dict) -> None:
    res = server.post("/mlsaes/tiny-mlsae/prompt/logits-recon",
                      json={"text": TEXT, "layer": 0, "top": 3}).json()
    module = resolve_site(built["model"], "blocks.0.hook_resid_post")[0]

    def splice(_m, _i, out):
        hidden = out[0] if isinstance(out, tuple) else out
        recon = reconstruct(built["params"], hidden.float(), K)[0]
        return (recon, *out[1:]) if isinstance(out, tuple) else recon

    with torch.inference_mode():
        clean = built["model"](built["ids"]).logits[0].log_softmax(-1)
        hook = module.register_forward_hook(splice)
        spliced = built["model"](built["ids"]).logits[0].log_softmax(-1)
        hook.remove()
    kl = (clean.exp() * (clean - spliced)).sum(-1)
    torch.testing.assert_close(torch.tensor(res["kl"]), kl, atol=1e-5, rtol=1e-4)
    assert min(res["kl"]) >= -1e-6 and max(res["kl"]) > 0
    last = res["positions"][-1]
    assert last["spliced"][0][1] == pytest.approx(float(spliced[-1].exp().max()), rel=1e-4)
    assert last["clean"][0][1] == pytest.approx(float(clean[-1].exp().max()), rel=1e-4)


def test_prompt_heatmap_columns(server: httpx.Client, built: dict) -> None:
    res = server.post("/mlsaes/tiny-mlsae/prompt/heatmap", json={"text": TEXT}).json()
    dense = dense_codes(reconstruct(built["params"], _residuals(built), K)[1], M)
    active = int((dense.amax(dim=0) > 1e-3).sum())
    assert res["layers"] == LAYERS and len(res["columns"]) == active > 0
    means = [c["layer_mean"] for c in res["columns"]]
    assert means == sorted(means, reverse=True)
    for c in res["columns"]:
        np.testing.assert_allclose(c["acts"], dense[:, c["position"], c["latent"]].numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_layer_histograms_count_every_latent(server: httpx.Client, built: dict) -> None:
    res = server.post("/mlsaes/tiny-mlsae/prompt/layer-histograms", json={"text": TEXT},
                      params={"bins": 8}).json()
    dense = dense_codes(reconstruct(built["params"], _residuals(built), K)[1], M)
    assert res["layers"] == LAYERS and len(res["edges"]) == 9
    assert res["edges"][-1] == pytest.approx(float(dense.max()), rel=1e-5)
    for li, counts in enumerate(res["counts"]):
        assert sum(counts) == dense[li].numel()  # zeros included, as the original
        ref = np.histogram(dense[li].numpy(), bins=8, range=(0, res["edges"][-1]))[0]
        assert np.abs(np.array(counts) - ref).sum() <= 2  # edge rounding of float32 histc


def test_the_mlsae_page_is_served_and_its_script_parses(server: httpx.Client) -> None:
    page = httpx.get(str(server.base_url).removesuffix("/api/") + "/mlsae", timeout=30)
    assert page.status_code == 200 and "/static/mlsae.js" in page.text
    script = httpx.get(str(server.base_url).removesuffix("/api/") + "/static/mlsae.js",
                       timeout=30).text
    for path in ("/prompt/latent-activations", "/prompt/logits-steer", "/prompt/logits-recon",
                 "/examples"):
        assert path in script
    node = shutil.which("node")
    if node:  # a syntax check; the page's behaviour is not exercised without a browser
        js = Path(__file__).resolve().parents[2] / "src/saeflow/viewer/static/mlsae.js"
        subprocess.run([node, "--check", str(js)], check=True, timeout=60)


def test_the_mlsae_page_in_a_browser(server: httpx.Client, page, built: dict) -> None:
    """Each of the page's four views drawn in headless Chromium, checked against the API."""
    root = str(server.base_url).removesuffix("/api/")
    external = []
    page.on("request", lambda r: None if r.url.startswith(root) else external.append(r.url))
    page.goto(root + "/mlsae")
    page.wait_for_selector("#layer option", state="attached")
    assert page.locator("#layer option").all_inner_texts() == [str(layer) for layer in LAYERS]
    page.fill("#text", TEXT)
    page.click("#run-acts")  # every layer a row, every token a column
    page.wait_for_selector("#acts")
    assert page.locator("#acts tr").count() == 1 + len(LAYERS)
    assert page.locator("#acts th").count() == 1 + built["ids"].shape[1]
    api = server.post("/mlsaes/tiny-mlsae/prompt/latent-activations",
                      json={"text": TEXT, "latent": None, "top": 3}).json()
    first = page.locator("#acts tr").nth(1).locator("td").nth(1).locator(".lat").first
    latent, _ = first.inner_text().split(":")
    assert int(latent) == api["latents"][0][0][0][0]
    first.click()  # a latent's id fills the box and shades the cells by its activation
    page.wait_for_function("document.getElementById('latent').value !== ''")
    assert page.input_value("#latent") == latent
    page.fill("#latent", "7")
    page.click("#run-examples")  # the loaded examples of latent 7: 2 layers x 2 ranks
    page.wait_for_selector("#out .sample")
    assert page.locator("#out .sample").count() == 2 * len(LAYERS)
    page.select_option("#layer", "1")
    page.fill("#factor", "40")
    page.fill("#latent", "5")
    page.click("#run-steer")
    page.wait_for_selector("#steer")
    steer = server.post("/mlsaes/tiny-mlsae/prompt/logits-steer", json={
        "text": TEXT, "latent": 5, "layer": 1, "factor": 40.0, "top": 10}).json()
    top = page.locator("#steer .col").first.locator("tr").first.locator("td")
    assert top.nth(0).inner_text() == json.dumps(steer["positions"][-1]["increase"][0][0])
    assert float(top.nth(1).inner_text()) == pytest.approx(
        steer["positions"][-1]["increase"][0][1], rel=1e-2)
    page.click("#run-recon")
    page.wait_for_selector("#recon")
    assert "KL(clean || spliced)" in page.inner_text("#recon h3")
    page.fill("#latent", str(M))  # out of range: the server's message, shown on the page
    page.click("#run-steer")
    page.wait_for_selector("#out .error")
    assert f"latent {M} out of range" in page.inner_text("#out .error")
    assert external == []


@pytest.mark.parametrize(("path", "body", "code", "words"), [
    ("/mlsaes/nope/prompt/latent-activations", {"text": "a"}, 404, "unknown MLSAE 'nope'"),
    ("/mlsaes/tiny-mlsae/prompt/logits-steer",
     {"text": "a", "latent": 1, "layer": 3, "factor": 1.0}, 404, "layer 3 is not read"),
    ("/mlsaes/tiny-mlsae/prompt/logits-steer",
     {"text": "a", "latent": 48, "layer": 0, "factor": 1.0}, 404, "latent 48 out of range"),
    ("/mlsaes/tiny-mlsae/prompt/logits-recon", {"text": "a", "layer": 2}, 404,
     "layer 2 is not read"),
])
def test_errors_name_the_problem(server: httpx.Client, path: str, body: dict, code: int,
                                 words: str) -> None:
    res = server.post(path, json=body)
    assert res.status_code == code and words in res.text

