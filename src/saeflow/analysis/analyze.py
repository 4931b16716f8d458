"""Stage: analyse one SAE's latents on its evaluation corpus into feature documents.

``python -m saeflow.analysis.analyze --info sae_eval/S/C.h5 --acts A.h5 --sae saes/S
--model MODEL_DIR --sae-id S --out analysis/S/features.jsonl.gz --summary analysis/S/summary.json``

``features.jsonl.gz``: one JSON document per latent (the shape of OpenMOSS's ``features``
collection and Neuronpedia's feature page)::

    {"index", "count", "freq", "max", "mean", "decoder_norm",
     "hist": {"max", "counts": [n_hist]},            # equal-width bins over [0, max]
     "logits": {"pos": [[token, value]], "neg": [[token, value]]},   # W_dec · W_U
     "neighbours": [[latent, cosine]],
     "samples": [{"kind": "top" | "bin" | "nonact", "bin", "bin_min", "bin_max", "bin_contains",
                  "row", "value", "centre", "tokens": [str], "acts": [float]}]}

``summary.json``: SAE id, model, site, corpus, d_sae, d_in, tokens analysed, settings, timing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeflow import h5io
from saeflow.analysis import stats
from saeflow.models import load_model
from saeflow.saes import load_sae

log = logging.getLogger("saeflow.analysis")


def unembedding(model: Any) -> torch.Tensor:
    """W_U [d, V] with the final norm's scale folded in, as TransformerLens's ``fold_ln`` does:
    the direct path of a residual direction to the logits passes through that scale."""
    w_u = model.get_output_embeddings().weight.detach().float().T
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    norm = getattr(inner, "norm", None) or getattr(inner, "ln_f", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        scale = norm.weight.detach().float()
        # Gemma's RMSNorm multiplies by (1 + weight)
        if type(norm).__name__.startswith("Gemma"):
            scale = 1.0 + scale
        w_u = scale[:, None] * w_u
    return w_u


class Corpus:
    """The evaluation file's CSR latents and the activations file's tokens and layout."""

    def __init__(self, info_path: str, acts_path: str, d_sae: int) -> None:
        # Any: h5py's item types (Group | Dataset | Datatype) are not narrowed by the checks
        self.info: Any = h5io.open_checked(info_path, datasets={"latent_ptr": (None,)})
        self.acts: Any = h5io.open_checked(acts_path, datasets={"tokens": (None,)})
        n = len(self.info["latent_ptr"]) - 1
        if n != len(self.acts["tokens"]):
            raise h5io.InputFileError(f"{info_path} has {n} tokens but {acts_path} has "
                                      f"{len(self.acts['tokens'])}: not the same corpus")
        if int(self.info.attrs["d_sae"]) != d_sae:
            raise h5io.InputFileError(f"{info_path}: d_sae {self.info.attrs['d_sae']}, SAE has "
                                      f"{d_sae}")
        self.seq_len = int(self.acts.attrs["ctx_len"]) - int(self.acts.attrs["skip_positions"])
        self.tokens = np.asarray(self.acts["tokens"][:])  # int32 [n]: 4 bytes a token
        self.d_sae = d_sae

    def chunks(self, chunk_tokens: int, desc: str):
        h5 = self.info
        return stats.iter_csr(h5["latent_ptr"], h5["latent_idx"], h5["latent_val"],
                              chunk_tokens, desc)


class Sampled:
    """All samples of all latents, flattened: latent, kind, bin, centre row, value."""

    def __init__(self, res: stats.LatentStats) -> None:
        m, parts = len(res.count), []
        ids = np.arange(m)
        t = res.top_row.shape[1]
        parts.append((np.repeat(ids, t), np.zeros(m * t), np.full(m * t, -1),
                      res.top_row.ravel(), res.top_val.ravel()))
        q, per = res.bin_row.shape[1:]
        parts.append((np.repeat(ids, q * per), np.ones(m * q * per),
                      np.tile(np.repeat(np.arange(q), per), m), res.bin_row.ravel(),
                      res.bin_val.ravel()))
        z = res.nonact_row.shape[1]
        parts.append((np.repeat(ids, z), np.full(m * z, 2), np.full(m * z, -1),
                      res.nonact_row.ravel(), np.zeros(m * z)))
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
        keep = cols[3] >= 0
        self.latent, self.kind, self.bin, self.row, self.value = (c[keep] for c in cols)
        self.kind = self.kind.astype(int)


KINDS = ("top", "bin", "nonact")


def analyse(corpus: Corpus, sae: Any, w_u: torch.Tensor, s: stats.Settings,
            args: argparse.Namespace) -> tuple[stats.LatentStats, Sampled, np.ndarray, Any, Any]:
    """The two statistics passes, the window pass, logits and neighbours."""
    res = stats.latent_stats(lambda: corpus.chunks(args.chunk_tokens, "analysis"),
                             corpus.d_sae, s)
    sampled = Sampled(res)
    rows = stats.window_rows(sampled.row, corpus.seq_len, args.before, args.after)
    acts = stats.gather_acts(corpus.chunks(args.chunk_tokens, "windows"), rows, sampled.latent,
                             corpus.d_sae)
    w_dec = sae.W_dec.detach().float()  # [d_sae, d_in]
    logits = stats.top_logits(w_dec, w_u, args.n_logits)
    near = stats.nearest_latents(w_dec, args.n_neighbours)
    return res, sampled, np.stack([rows, acts.astype(np.float64)]), logits, near


def round_sig(x: np.ndarray | float, sig: int = 5) -> np.ndarray:
    """``x`` rounded to ``sig`` significant digits, elementwise, as ``float(f"{v:.5g}")`` gives
    (display precision for the documents; one numpy pass instead of a format call per value)."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    nz = (x != 0) & np.isfinite(x)
    scale = 10.0 ** (sig - 1 - np.floor(np.log10(np.abs(x[nz]))))
    out[nz] = np.round(x[nz] * scale) / scale
    return out


def documents(res: stats.LatentStats, sampled: Sampled, windows: np.ndarray, logits, near,
              dec_norm: np.ndarray, corpus: Corpus, vocab: dict[int, str]):
    """One JSON-ready document per latent. Values are rounded and token ids turned into strings
    for all samples at once; the loop only slices per latent."""
    rows, acts = windows[0].astype(np.int64), round_sig(windows[1])
    ok = rows >= 0
    strings = np.empty(max(int(corpus.tokens.max()), *vocab) + 1, dtype=object)
    for t, text in vocab.items():
        strings[t] = text
    words = strings[corpus.tokens[np.where(ok, rows, 0)]]  # [n_samples, window]
    at = np.argmax((rows == sampled.row[:, None]) & ok, axis=1)  # the sample's own token
    centre = np.take_along_axis(np.cumsum(ok, axis=1), at[:, None], axis=1)[:, 0] - 1
    value = round_sig(sampled.value).tolist()
    n_bins = res.bin_count.shape[1]
    b = np.maximum(sampled.bin.astype(np.int64), 0)
    vmax = res.max[sampled.latent]
    bin_min = round_sig(vmax * b / n_bins).tolist()
    bin_max = round_sig(vmax * (b + 1) / n_bins).tolist()
    bin_contains = round_sig(res.bin_count[sampled.latent, b]
                             / np.maximum(res.count[sampled.latent], 1)).tolist()
    order = np.argsort(sampled.latent, kind="stable")
    starts = np.searchsorted(sampled.latent[order], np.arange(len(res.count) + 1))
    vmax_r, mean_r, norm_r = (round_sig(v).tolist() for v in (res.max, res.mean_act, dec_norm))
    logit_val = {side: round_sig(getattr(logits, f"{side}_val").numpy()).tolist()
                 for side in ("pos", "neg")}
    logit_ids = {side: getattr(logits, f"{side}_ids").tolist() for side in ("pos", "neg")}
    near_ids, near_cos = near.ids.tolist(), round_sig(near.cos.numpy()).tolist()
    for i in range(len(res.count)):
        samples = []
        for j in order[starts[i] : starts[i + 1]].tolist():
            keep = ok[j]
            sample = {"kind": KINDS[sampled.kind[j]], "bin": int(sampled.bin[j]),
                      "row": int(sampled.row[j]), "value": value[j], "centre": int(centre[j]),
                      "tokens": words[j][keep].tolist(), "acts": acts[j][keep].tolist()}
            if sampled.bin[j] >= 0:
                sample |= {"bin_min": bin_min[j], "bin_max": bin_max[j],
                           "bin_contains": bin_contains[j]}
            samples.append(sample)
        yield {
            "index": i, "count": int(res.count[i]), "freq": float(res.freq[i]),
            "max": vmax_r[i], "mean": mean_r[i], "decoder_norm": norm_r[i],
            "hist": {"max": vmax_r[i], "counts": res.hist[i].tolist()},
            "logits": {side: [[vocab[t], v] for t, v in zip(logit_ids[side][i],
                                                            logit_val[side][i], strict=True)]
                       for side in ("pos", "neg")},
            "neighbours": [[a, c] for a, c in zip(near_ids[i], near_cos[i], strict=True)],
            "samples": samples,
        }


def token_strings(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    """Each token id's text on its own (``decode([id])``: ' the', not 'Ġthe')."""
    return {int(t): tokenizer.decode([int(t)]) for t in np.unique(ids)}


def write_documents(path: str, docs) -> int:
    n = 0
    # level 1: 29% larger than level 9 and far faster to write (measured on the default's SAE);
    # only the database load and the dashboard read the file
    with h5io.atomic_path(path) as tmp, \
            gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    sae = load_sae(args.sae)
    corpus = Corpus(args.info, args.acts, sae.cfg.d_sae)
    model, tokenizer = load_model(args.model)
    w_u = unembedding(model)
    del model
    s = stats.Settings(args.n_top, args.n_bins, args.n_per_bin, args.n_nonact, args.n_hist,
                       args.seed)
    t1 = time.perf_counter()
    res, sampled, windows, logits, near = analyse(corpus, sae, w_u, s, args)
    used = np.concatenate([corpus.tokens[windows[0][windows[0] >= 0].astype(np.int64)],
                           logits.pos_ids.numpy().ravel(), logits.neg_ids.numpy().ravel()])
    vocab = token_strings(tokenizer, used)
    dec_norm = sae.W_dec.detach().float().norm(dim=1).numpy()
    n = write_documents(args.out, documents(res, sampled, windows, logits, near, dec_norm,
                                            corpus, vocab))
    t2 = time.perf_counter()
    summary = {"sae_id": args.sae_id, "model": str(corpus.acts.attrs.get("model", "")),
               "site": str(corpus.info.attrs.get("site", "")),
               "corpus": str(corpus.acts.attrs.get("corpus", "")), "d_sae": n,
               "d_in": int(sae.cfg.d_in), "n_tokens": res.n_tokens,
               "sae_path": args.sae, "model_path": args.model,
               "dead_fraction": float((res.count == 0).mean()), "settings": vars(s),
               "window": [args.before, args.after], "analysis_seconds": t2 - t1,
               "tokens_per_second": res.n_tokens / max(t2 - t1, 1e-9)}
    h5io.write_json(args.summary, summary)
    log.info("analysed %d latents on %d tokens in %.1f s", n, res.n_tokens, t2 - t0)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saeflow.analysis.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--info", required=True, help="SAE evaluation file sae_eval/{sae}/{corpus}.h5")
    p.add_argument("--acts", required=True, help="activations file of the same corpus (tokens)")
    p.add_argument("--sae", required=True, help="SAE folder (SAELens layout)")
    p.add_argument("--model", required=True, help="model folder: tokenizer and unembedding")
    p.add_argument("--sae-id", required=True, help="recorded in the summary")
    p.add_argument("--out", required=True, help="feature documents (.jsonl.gz)")
    p.add_argument("--summary", required=True, help="summary (.json)")
    p.add_argument("--n-top", type=int, default=10, help="top-activating samples per latent")
    p.add_argument("--n-bins", type=int, default=5, help="activation-interval groups")
    p.add_argument("--n-per-bin", type=int, default=5, help="samples per interval group")
    p.add_argument("--n-nonact", type=int, default=10, help="non-activating samples")
    p.add_argument("--n-hist", type=int, default=32, help="activation histogram bins")
    p.add_argument("--n-logits", type=int, default=10, help="top +/- logits")
    p.add_argument("--n-neighbours", type=int, default=10, help="nearest latents by decoder cosine")
    p.add_argument("--before", type=int, default=16, help="context tokens before a sample")
    p.add_argument("--after", type=int, default=4, help="context tokens after a sample")
    p.add_argument("--chunk-tokens", type=int, default=16384, help="tokens per CSR chunk")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    for key in ("n_top", "n_bins", "n_per_bin", "n_nonact", "n_hist", "n_logits", "chunk_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
