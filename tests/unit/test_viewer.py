"""The viewer end to end: a real tiny analysis (SmolLM2 layer 0, a random TopK SAE) through the
analyze stage into SQLite, served by a real uvicorn on 127.0.0.1, queried with httpx and opened in
headless Debian Chromium through Playwright (system browser, no download)."""

import os
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from viewer_server import viewer_server

from saeflow import h5io
from saeflow.analysis import analyze, dashboard, store
from saeflow.models import load_model, resolve_site, site_activation
from saeflow.sae_eval import evaluate_reconstruction

SITE, D_SAE, SEQ = "blocks.0.hook_resid_post", 64, 24
TEXT = ("The central bank raised interest rates on Tuesday. Shares in London fell as investors "
        "sold banks and bought bonds. The minister said the government would cut taxes next year.")


def _acts_file(model_dir: Path, tmp: Path) -> Path:
    model, tok = load_model(str(model_dir))
    ids = tok(TEXT * 3, return_tensors="pt").input_ids[0][: 4 * SEQ].reshape(4, SEQ)
    module, _ = resolve_site(model, SITE)
    got = []
    hook = module.register_forward_hook(lambda _m, _i, out: got.append(site_activation(out)))
    with torch.inference_mode():
        model(ids)
    hook.remove()
    path = tmp / "acts.h5"
    with h5py.File(path, "w") as h5:
        h5["acts"] = got[0].reshape(-1, got[0].shape[-1]).float().numpy()
        h5["tokens"] = ids.reshape(-1).numpy().astype(np.int32)
        h5io.write_attrs(h5, {"model": "smollm2", "corpus": "text", "site": SITE, "ctx_len": SEQ,
                              "skip_positions": 0})
        h5io.mark_complete(h5)
    return path


@pytest.fixture(scope="module")
def built(packaged_model_dir, tmp_path_factory):
    """Analysis files and a loaded SQLite database of a random TopK SAE on 96 real tokens."""
    tmp = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=D_SAE, k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    sae.save_model(str(tmp / "sae"))
    acts = _acts_file(packaged_model_dir, tmp)
    metrics = evaluate_reconstruction(sae, str(acts), str(tmp / "info.h5"), 40,
                                      {"sae_id": "tiny", "site": SITE})
    h5io.write_json(tmp / "metrics.json", {"sae_id": "tiny", **metrics})
    analyze.main(["--info", str(tmp / "info.h5"), "--acts", str(acts), "--sae", str(tmp / "sae"),
                  "--model", str(packaged_model_dir), "--sae-id", "tiny", "--out",
                  str(tmp / "features.jsonl.gz"), "--summary", str(tmp / "summary.json"),
                  "--n-top", "3", "--n-per-bin", "2", "--chunk-tokens", "40"])
    store.main(["load", "--db", str(tmp / "features.sqlite"), "--sae-id", "tiny", "--features",
                str(tmp / "features.jsonl.gz"), "--summary", str(tmp / "summary.json"),
                "--metrics", str(tmp / "metrics.json")])
    return tmp


@pytest.fixture(scope="module")
def server(built):
    with viewer_server(str(built / "features.sqlite"), "/api/dictionaries") as url:
        yield url


def test_analysis_documents_are_consistent(built):
    s = store.open_store(str(built / "features.sqlite"))
    assert s.feature_count("tiny") == D_SAE
    with h5py.File(built / "info.h5") as h5:
        freq, ptr, idx, val = (np.asarray(h5[k]) for k in ("latent_freq", "latent_ptr",
                                                           "latent_idx", "latent_val"))
    rows = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    for i in range(D_SAE):
        doc = s.feature("tiny", i)
        assert doc is not None
        assert doc["freq"] == pytest.approx(freq[i])
        mine = val[idx == i]
        assert doc["max"] == pytest.approx(mine.max() if len(mine) else 0.0, rel=1e-4)
        for sample in doc["samples"]:
            # the centre token's activation in its window is the sample's value
            assert sample["acts"][sample["centre"]] == pytest.approx(sample["value"], rel=1e-4)
            if sample["kind"] == "top":
                assert sample["row"] in rows[idx == i]
    s.close()


def test_endpoints(server):
    c = httpx.Client(base_url=server + "/api", timeout=120)
    assert [d["name"] for d in c.get("/dictionaries").json()] == ["tiny"]
    assert c.get("/dictionaries/tiny/metrics").json()["fvu"] > 0
    assert c.get("/dictionaries/tiny/features/count").json() == {"count": D_SAE}
    doc = c.get("/dictionaries/tiny/features/5").json()
    assert doc["index"] == 5 and len(doc["logits"]["pos"]) == 10
    rnd = c.get("/dictionaries/tiny/features/random", params={"min_freq": 0.01, "seed": 1}).json()
    assert rnd["freq"] >= 0.01
    assert "top" in c.get(f"/dictionaries/tiny/features/{rnd['index']}/samplings").json()
    res = c.post("/dictionaries/tiny/infer", json={"text": "The bank raised rates."}).json()
    assert res["tokens"][0]["token"] == "The" and any(t["latents"] for t in res["tokens"])
    one = c.post("/dictionaries/tiny/features/3/infer", json={"text": "The bank"}).json()
    assert len(one["acts"]) == len(one["tokens"])
    put = c.put("/dictionaries/tiny/features/5/interpretation", json={"text": "banks"})
    assert put.json()["interpretations"][0]["text"] == "banks"
    assert c.post("/dictionaries/tiny/features/5/bookmark", json={}).status_code == 200
    assert c.get("/bookmarks").json()[0]["index"] == 5
    assert c.delete("/dictionaries/tiny/features/5/bookmark").status_code == 200


@pytest.mark.parametrize(("method", "path", "body", "code", "words"), [
    ("get", "/dictionaries/nope", None, 404, "unknown dictionary 'nope'"),
    ("get", "/dictionaries/tiny/features/64", None, 404, "out of range"),
    ("get", "/dictionaries/tiny/features/-1", None, 404, "out of range"),
    ("get", "/dictionaries/tiny/features/abc", None, 422, "int"),
    ("get", "/dictionaries/tiny/features/random?min_freq=2", None, 422, "less than or equal"),
    ("get", "/dictionaries/tiny/features/random?min_freq=0.99", None, 404, "no latent"),
    ("post", "/dictionaries/tiny/infer", {"text": "x" * 2001}, 422, "at most 2000"),
    ("post", "/dictionaries/tiny/infer", {"text": ""}, 422, "at least 1"),
    ("post", "/dictionaries/nope/infer", {"text": "hi"}, 404, "unknown dictionary"),
    ("put", "/dictionaries/tiny/features/99/interpretation", {"text": "a"}, 404, "out of range"),
    ("delete", "/dictionaries/tiny/features/7/bookmark", None, 404, "not bookmarked"),
])
def test_bad_requests_get_4xx_with_a_message(server, method, path, body, code, words):
    r = httpx.request(method, server + "/api" + path, json=body, timeout=60)
    assert r.status_code == code, r.text
    assert words in r.text


def test_static_dashboard_is_self_contained(built, tmp_path):
    out = tmp_path / "index.html"
    dashboard.main(["--features", str(built / "features.jsonl.gz"), "--summary",
                    str(built / "summary.json"), "--metrics", str(built / "metrics.json"),
                    "--n", "5", "--out", str(out)])
    page = out.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "src=" not in page.replace('"src="', "")
    assert page.count('"index":') >= 5


def test_browser_feature_card_and_prompt(server, page, built, tmp_path_factory):
    s = store.open_store(str(built / "features.sqlite"))
    busy = max(range(D_SAE), key=lambda i: s.feature("tiny", i)["count"])  # type: ignore[index]
    s.close()
    external = []
    page.on("request", lambda r: None if r.url.startswith(server) else external.append(r.url))
    t0 = time.perf_counter()
    page.goto(f"{server}/#/tiny/feature/{busy}")
    page.wait_for_selector(f".feature-card[data-index='{busy}']")
    load_s = time.perf_counter() - t0
    bars = page.locator("#act-hist svg rect.hist-bar")
    assert bars.count() == 32
    heights = [float(bars.nth(i).get_attribute("height") or 0) for i in range(32)]
    assert max(heights) > 0
    active = page.locator("#samples .tok.active")
    assert active.count() > 0
    first = active.first
    assert first.get_attribute("title", timeout=1000).startswith("activation ")  # type: ignore[union-attr]
    assert "255, 120, 0" in first.evaluate("e => getComputedStyle(e).backgroundColor")
    first.hover()
    assert page.locator("#hover").inner_text().strip() != ""
    shots = Path(os.environ.get("SAEFLOW_ARTEFACTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "feature_card.png"), full_page=True)
    # keyboard: right arrow moves to the next latent
    page.locator("body").press("ArrowRight")
    page.wait_for_selector(f".feature-card[data-index='{(busy + 1) % D_SAE}']")
    # overview
    page.goto(f"{server}/#/tiny/overview")
    page.wait_for_selector("#overview svg rect.freq-bar", state="attached")
    freq_bars = page.locator("#overview svg rect.freq-bar")
    assert max(float(freq_bars.nth(i).get_attribute("height") or 0)
               for i in range(freq_bars.count())) > 0
    # prompt page
    page.goto(f"{server}/#/tiny/prompt")
    page.fill("#prompt-text", "The bank raised interest rates.")
    page.click("#prompt-run")
    page.wait_for_selector("#prompt-out .prompt-tok .lat", timeout=120_000)
    assert page.locator("#prompt-out .prompt-tok").count() >= 5
    page.screenshot(path=str(shots / "prompt.png"), full_page=True)
    assert external == []
    print(f"feature card load {load_s:.3f} s; screenshots in {shots}")
