"""The feature viewer: FastAPI over the feature database, plus the static page in ``static/``.

Endpoints follow OpenMOSS's server (reference: mlsae-openmoss-saex.md section 2), under /api:

GET  /dictionaries                               loaded SAEs
GET  /dictionaries/{name}                        summary and metrics
GET  /dictionaries/{name}/metrics                metrics (the SAE's row of tables/sae_metrics.csv)
GET  /dictionaries/{name}/features/count
GET  /dictionaries/{name}/frequencies            [index, freq, max] of every latent (overview)
GET  /dictionaries/{name}/features/random?min_freq=&max_freq=&seed=
GET  /dictionaries/{name}/features/{index}
GET  /dictionaries/{name}/features/{index}/samplings
POST /dictionaries/{name}/infer                  {"text"}: active latents per token
POST /dictionaries/{name}/features/{index}/infer {"text"}: that latent's activation per token
PUT  /dictionaries/{name}/features/{index}/interpretation  {"text", "score"}
GET  /bookmarks; POST, DELETE /dictionaries/{name}/features/{index}/bookmark

Multi-layer SAEs (the original mlsae app's views; their examples and paths come from the
``mlsaes`` and ``layer_examples`` tables that ``saeflow.mlsae.examples`` loads; page ``/mlsae``):

GET  /mlsaes                                     loaded MLSAEs (layers, d_sae, paths)
GET  /mlsaes/{name}/features/{index}/examples?layer=   max-activating examples per layer
POST /mlsaes/{name}/prompt/latent-activations    {"text", "latent"?, "top"}: per layer, each
                                                 token's active latents (and one latent's acts)
POST /mlsaes/{name}/prompt/logits-steer          {"text", "latent", "layer", "factor", "top"}:
                                                 logit change per position when
                                                 factor * W_dec[latent] is added to the residual
                                                 stream at that layer (every position)
POST /mlsaes/{name}/prompt/logits-recon          {"text", "layer", "top"}: top next-token
                                                 predictions clean and with the MLSAE's
                                                 reconstruction spliced in at that layer, and
                                                 KL(clean || spliced) per position
POST /mlsaes/{name}/prompt/heatmap               {"text"}: the prompt heatmap's columns (each
                                                 active (token, latent) pair's activation per
                                                 layer, sorted by mean layer)
POST /mlsaes/{name}/prompt/layer-histograms?bins=64  {"text"}: per layer, a histogram of all
                                                 latent activations (zeros included) over
                                                 [0, max], the original's equal-width bins
"""

from __future__ import annotations

import functools
import random
import threading
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from saeflow.analysis.store import FeatureStore, open_store

STATIC = Path(__file__).resolve().parent / "static"
MAX_TEXT_CHARS = 2000
MAX_TOKENS = 256


class Text(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class Interpretation(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    score: dict[str, float] | None = None


class Bookmark(BaseModel):
    note: str = Field(default="", max_length=2000)


class MLSAEPrompt(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    latent: int | None = Field(default=None, ge=0)
    top: int = Field(default=5, ge=1, le=64)


class Steer(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    latent: int = Field(ge=0)
    layer: int = Field(ge=0)
    factor: float = Field(ge=-1000.0, le=1000.0)
    top: int = Field(default=5, ge=1, le=50)


class Recon(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    layer: int = Field(ge=0)
    top: int = Field(default=5, ge=1, le=50)


class MLSAERunner:
    """Model + MLSAE, loaded on first use, for the prompt views."""

    def __init__(self, model_dir: str, sae_dir: str) -> None:
        from saeflow.mlsae.trainer import load_mlsae
        from saeflow.models import load_model, resolve_site

        self.model, self.tokenizer = load_model(model_dir)
        self.sae = load_mlsae(sae_dir)
        self.modules = {layer: resolve_site(self.model, f"blocks.{layer}.hook_resid_post")[0]
                        for layer in self.sae.layers}

    def ids(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS]
        if ids.shape[1] == 0:
            raise HTTPException(422, "the text has no tokens")
        return ids

    def tokens(self, ids: torch.Tensor) -> list[str]:
        return [str(self.tokenizer.decode([t])) for t in ids[0].tolist()]

    def codes(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK codes (values, indices) [n_layers, n_tokens, k] at every MLSAE layer."""
        from saeflow.mlsae.math import reconstruct
        from saeflow.mlsae.prompt import layer_residuals

        x = layer_residuals(self.model, ids, self.sae.layers)
        codes = reconstruct(self.sae.params, x, self.sae.k)[1]
        return codes.values, codes.indices

    def spliced(self, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean logits and logits with the reconstruction at ``layer`` [n_tokens, vocab]."""
        from saeflow.mlsae.math import reconstruct

        def splice(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            recon = reconstruct(self.sae.params, hidden.float(), self.sae.k)[0].to(hidden.dtype)
            return (recon, *output[1:]) if isinstance(output, tuple) else recon

        with torch.inference_mode():
            clean = self.model(ids).logits[0].float()
            hook = self.modules[layer].register_forward_hook(splice)
            try:
                spliced = self.model(ids).logits[0].float()
            finally:
                hook.remove()
        return clean, spliced

    def steer(self, ids: torch.Tensor, latent: int, layer: int,
              factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and steered logits [n_tokens, vocab]."""
        direction = factor * self.sae.params.W_dec[latent]

        def add(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + direction.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        with torch.inference_mode():
            clean = self.model(ids).logits[0].float()
            hook = self.modules[layer].register_forward_hook(add)
            try:
                steered = self.model(ids).logits[0].float()
            finally:
                hook.remove()
        return clean, steered


class Runner:
    """Model + SAE of one dictionary, loaded on first use, for ``infer``."""

    def __init__(self, model_dir: str, sae_dir: str, site: str) -> None:
        from saeflow.models import load_model, resolve_site
        from saeflow.saes import load_sae

        self.model, self.tokenizer = load_model(model_dir)
        self.sae = load_sae(sae_dir)
        self.module, _ = resolve_site(self.model, site)

    def latents(self, text: str) -> tuple[list[str], torch.Tensor]:
        """Token strings and latents [n_tokens, d_sae] of ``text``."""
        from saeflow.models import site_activation

        ids = self.tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS]
        if ids.shape[1] == 0:
            raise HTTPException(422, "the text has no tokens")
        captured: list[torch.Tensor] = []
        hook = self.module.register_forward_hook(
            lambda _m, _i, out: captured.append(site_activation(out)))
        try:
            with torch.inference_mode():
                self.model(ids)
                acts = self.sae.encode(captured[0][0].float())
        finally:
            hook.remove()
        return [str(self.tokenizer.decode([t])) for t in ids[0].tolist()], acts


def create_app(db: str, root: str | None = None) -> FastAPI:
    """The viewer app over the database ``db``; model and SAE paths of ``infer`` are relative to
    ``root`` (the workflow's results folder; default: the SQLite file's folder)."""
    store = open_store(db)
    lock = threading.Lock()  # one connection, requests run in a thread pool
    base = Path(root) if root else (Path(db).parent if "://" not in db else Path.cwd())
    app = FastAPI(title="saeflow feature viewer")

    def call(method: str, *args: Any) -> Any:
        with lock:
            return getattr(store, method)(*args)

    def sae(name: str) -> dict:
        found = call("sae", name)
        if found is None:
            names = [s["name"] for s in call("saes")]
            raise HTTPException(404, f"unknown dictionary '{name}'; loaded: {names}")
        return found

    def feature(name: str, index: int) -> dict:
        n = sae(name)["summary"]["d_sae"]
        if not 0 <= index < n:
            raise HTTPException(404, f"latent {index} out of range: '{name}' has latents 0..{n - 1}")
        doc = call("feature", name, index)
        if doc is None:
            raise HTTPException(404, f"latent {index} of '{name}' is not in the database")
        return doc

    @functools.lru_cache(maxsize=2)
    def runner(name: str) -> Runner:
        s = sae(name)["summary"]
        return Runner(str(base / s["model_path"]), str(base / s["sae_path"]), s["site"])

    def mlsae(name: str) -> dict:
        found = call("mlsae", name)
        if found is None:
            names = [s["name"] for s in call("mlsaes")]
            raise HTTPException(404, f"unknown MLSAE '{name}'; loaded: {names}")
        return found["summary"]

    @functools.lru_cache(maxsize=2)
    def mlsae_runner(name: str) -> MLSAERunner:
        s = mlsae(name)
        return MLSAERunner(str(base / s["model_path"]), str(base / s["sae_path"]))

    _routes(app, store, call, sae, feature, runner)
    _mlsae_routes(app, call, mlsae, mlsae_runner)
    _mlsae_prompt_routes(app, mlsae, mlsae_runner)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/mlsae", include_in_schema=False)
    def mlsae_page() -> FileResponse:
        return FileResponse(STATIC / "mlsae.html")

    app.state.store = store
    return app


def _routes(app: FastAPI, store: FeatureStore, call, sae, feature, runner) -> None:
    @app.get("/api/dictionaries")
    def dictionaries() -> list[dict]:
        return [{"name": s["name"], "n_features": s["summary"]["d_sae"], **s["summary"]}
                for s in call("saes")]

    @app.get("/api/dictionaries/{name}")
    def dictionary(name: str) -> dict:
        return sae(name)

    @app.get("/api/dictionaries/{name}/metrics")
    def metrics(name: str) -> dict:
        return sae(name)["metrics"] or {}

    @app.get("/api/dictionaries/{name}/features/count")
    def count(name: str) -> dict:
        sae(name)
        return {"count": call("feature_count", name)}

    @app.get("/api/dictionaries/{name}/frequencies")
    def frequencies(name: str) -> list[list[float]]:
        sae(name)
        return [list(r) for r in call("frequencies", name)]

    @app.get("/api/dictionaries/{name}/features/random")
    def random_feature(name: str, min_freq: float = Query(0.0, ge=0, le=1),
                       max_freq: float = Query(1.0, ge=0, le=1), seed: int | None = None) -> dict:
        sae(name)
        ids = call("feature_indices", name, min_freq, max_freq)
        if not ids:
            raise HTTPException(404, f"no latent of '{name}' has frequency in "
                                     f"[{min_freq}, {max_freq}]")
        return feature(name, random.Random(seed).choice(ids))

    @app.get("/api/dictionaries/{name}/features/{index}")
    def feature_by_index(name: str, index: int) -> dict:
        return feature(name, index)

    @app.get("/api/dictionaries/{name}/features/{index}/samplings")
    def samplings(name: str, index: int) -> dict:
        groups: dict[str, list[dict]] = {}
        for s in feature(name, index)["samples"]:
            key = f"bin{s['bin']}" if s["kind"] == "bin" else s["kind"]
            groups.setdefault(key, []).append(s)
        return groups

    @app.post("/api/dictionaries/{name}/infer")
    def infer(name: str, body: Text, top: int = Query(5, ge=1, le=50)) -> dict:
        sae(name)
        tokens, acts = runner(name).latents(body.text)
        k = min(top, acts.shape[1])
        vals, ids = acts.topk(k, dim=1)
        return {"tokens": [{"token": t, "latents": [[int(i), float(v)] for i, v in
                                                     zip(ids[p].tolist(), vals[p].tolist(),
                                                         strict=True) if v > 0]}
                           for p, t in enumerate(tokens)]}

    @app.post("/api/dictionaries/{name}/features/{index}/infer")
    def infer_feature(name: str, index: int, body: Text) -> dict:
        feature(name, index)
        tokens, acts = runner(name).latents(body.text)
        return {"tokens": tokens, "acts": acts[:, index].tolist()}

    @app.put("/api/dictionaries/{name}/features/{index}/interpretation")
    def put_interpretation(name: str, index: int, body: Interpretation) -> dict:
        feature(name, index)
        call("put_interpretation", name, index, body.text, body.score)
        return {"interpretations": call("interpretations", name, index)}

    @app.get("/api/bookmarks")
    def bookmarks() -> list[dict]:
        return call("bookmarks")

    @app.post("/api/dictionaries/{name}/features/{index}/bookmark")
    def add_bookmark(name: str, index: int, body: Bookmark) -> dict:
        feature(name, index)
        call("add_bookmark", name, index, body.note)
        return {"bookmarked": True}

    @app.delete("/api/dictionaries/{name}/features/{index}/bookmark")
    def delete_bookmark(name: str, index: int) -> dict:
        feature(name, index)
        if not call("delete_bookmark", name, index):
            raise HTTPException(404, f"latent {index} of '{name}' is not bookmarked")
        return {"bookmarked": False}


def _mlsae_routes(app: FastAPI, call, mlsae, runner) -> None:
    def check_latent(name: str, index: int) -> dict:
        s = mlsae(name)
        if not 0 <= index < s["d_sae"]:
            raise HTTPException(404, f"latent {index} out of range: '{name}' has latents "
                                     f"0..{s['d_sae'] - 1}")
        return s

    @app.get("/api/mlsaes")
    def mlsaes() -> list[dict]:
        return [{"name": s["name"], **s["summary"]} for s in call("mlsaes")]

    @app.get("/api/mlsaes/{name}/features/{index}/examples")
    def examples(name: str, index: int, layer: int | None = None) -> list[dict]:
        s = check_latent(name, index)
        if layer is not None and layer not in s["layers"]:
            raise HTTPException(404, f"layer {layer} is not read by '{name}' "
                                     f"(layers {s['layers']})")
        return call("layer_examples", name, index, layer)

    @app.post("/api/mlsaes/{name}/prompt/latent-activations")
    def latent_activations(name: str, body: MLSAEPrompt) -> dict:
        s = mlsae(name) if body.latent is None else check_latent(name, body.latent)
        r = runner(name)
        ids = r.ids(body.text)
        values, indices = r.codes(ids)  # (L, T, k)
        top = min(body.top, values.shape[-1])
        vals, order = values.topk(top, dim=-1)
        idx = indices.gather(-1, order)
        out: dict[str, Any] = {"tokens": r.tokens(ids), "layers": s["layers"], "latents": [
            [[[int(i), float(v)] for i, v in zip(idx[li, p].tolist(), vals[li, p].tolist(),
                                                 strict=True) if v > 0]
             for p in range(values.shape[1])] for li in range(values.shape[0])]}
        if body.latent is not None:
            hit = (indices == body.latent) & (values > 0)
            out["latent_acts"] = (values * hit).sum(-1).tolist()  # (L, T)
        return out

    @app.post("/api/mlsaes/{name}/prompt/logits-steer")
    def logits_steer(name: str, body: Steer) -> dict:
        s = check_latent(name, body.latent)
        if body.layer not in s["layers"]:
            raise HTTPException(404, f"layer {body.layer} is not read by '{name}' "
                                     f"(layers {s['layers']})")
        r = runner(name)
        ids = r.ids(body.text)
        clean, steered = r.steer(ids, body.latent, body.layer, body.factor)
        delta = steered - clean  # the original's logit change

        def pairs(values: torch.Tensor, ids_: torch.Tensor) -> list[list]:
            return [[str(r.tokenizer.decode([int(t)])), float(v)]
                    for t, v in zip(ids_.tolist(), values.tolist(), strict=True)]

        up, down = delta.topk(body.top, dim=-1), (-delta).topk(body.top, dim=-1)
        return {"tokens": r.tokens(ids), "latent": body.latent, "layer": body.layer,
                "factor": body.factor, "max_abs_change": float(delta.abs().max()),
                "positions": [{"increase": pairs(up.values[p], up.indices[p]),
                               "decrease": pairs(-down.values[p], down.indices[p])}
                              for p in range(delta.shape[0])]}


def _mlsae_prompt_routes(app: FastAPI, mlsae, runner) -> None:
    def check_layer(name: str, layer: int) -> dict:
        s = mlsae(name)
        if layer not in s["layers"]:
            raise HTTPException(404, f"layer {layer} is not read by '{name}' "
                                     f"(layers {s['layers']})")
        return s

    @app.post("/api/mlsaes/{name}/prompt/logits-recon")
    def logits_recon(name: str, body: Recon) -> dict:
        check_layer(name, body.layer)
        r = runner(name)
        ids = r.ids(body.text)
        clean, spliced = (t.log_softmax(-1) for t in r.spliced(ids, body.layer))
        kl = (clean.exp() * (clean - spliced)).sum(-1)

        def top(logp: torch.Tensor) -> list[list]:
            values, idx = logp.topk(body.top)
            return [[str(r.tokenizer.decode([int(t)])), float(v)]
                    for t, v in zip(idx.tolist(), values.exp().tolist(), strict=True)]

        return {"tokens": r.tokens(ids), "layer": body.layer, "kl": kl.tolist(),
                "positions": [{"clean": top(clean[p]), "spliced": top(spliced[p])}
                              for p in range(clean.shape[0])]}

    @app.post("/api/mlsaes/{name}/prompt/layer-histograms")
    def layer_histograms(name: str, body: Text, bins: int = Query(64, ge=1, le=1024)) -> dict:
        from saeflow.mlsae.prompt import layer_residuals, prompt_latents

        s = mlsae(name)
        r = runner(name)
        latents = prompt_latents(r.sae, layer_residuals(r.model, r.ids(body.text), r.sae.layers))
        top = float(latents.max())
        edges = torch.linspace(0, top, bins + 1).tolist()
        counts = [torch.histc(layer, bins=bins, min=0, max=top).long().tolist()
                  for layer in latents]
        return {"layers": s["layers"], "edges": edges, "counts": counts}

    @app.post("/api/mlsaes/{name}/prompt/heatmap")
    def heatmap(name: str, body: Text) -> dict:
        from saeflow.mlsae.prompt import layer_residuals, prompt_latents, prompt_table

        s = mlsae(name)
        r = runner(name)
        ids = r.ids(body.text)
        latents = prompt_latents(r.sae, layer_residuals(r.model, ids, r.sae.layers))
        table = prompt_table(latents, r.tokens(ids), s["layers"], name)
        columns: dict[int, dict] = {}
        for row in table.to_dict("records"):
            col = columns.setdefault(int(row["rank"]), {
                "rank": int(row["rank"]), "position": int(row["position"]),
                "token": str(row["token"]), "latent": int(row["latent"]),
                "layer_mean": float(row["layer_mean"]), "acts": []})
            col["acts"].append(float(row["act"]))  # rows come layer by layer, in order
        return {"layers": s["layers"], "columns": [columns[k] for k in sorted(columns)]}
