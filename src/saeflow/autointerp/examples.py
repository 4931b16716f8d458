"""Stage: latent examples for auto-interpretation (the explainer's and the scorers' inputs).

``python -m saeflow.autointerp.examples --acts A.h5 --tokens T.h5 --sae saes/E --sae-id E
--out examples.h5 [--base-sae saes/B --fit F.h5 --component linear|nonlinear]
[--n-latents 50] [--ctx-len 32] [--n-top 10] [--n-per-decile 7] [--n-random 50]
[--max-examples 2000] [--min-examples 20] [--seed 0] [--chunk-tokens 4096] [--threads 0]``

Activations of each latent are those of the SAE ``E`` on the evaluation corpus: for an error SAE
(``--base-sae``), x -> SaeError = x - Base(x) -> the linear or nonlinear component
(:mod:`saeflow.error_saes`) -> E; without ``--base-sae``, E encodes x itself.

Examples follow sae-auto-interp's ``FeatureCache`` / ``FeatureConfig`` (reference A4): the
cached positions of every sequence are cut into non-overlapping windows of ``ctx_len`` tokens
(a sequence's last ``kept mod ctx_len`` positions are dropped) and a window's activation is the
latent's maximum over it. Per latent:

- kind 1, explainer examples: the ``n_top`` windows with the highest activation;
- kind 2, test examples: the latent's activating windows (at most ``max_examples``, the top ones)
  cut into 10 equal-count quantiles by activation (decile 10 = highest), ``n_per_decile`` drawn
  (seeded) from each, never one of the explainer's windows;
- kind 3, ``n_random`` windows (seeded) where the latent is zero everywhere;
- kind 0, padding when a latent has too few windows of a kind.

Latents are drawn in a seeded random order; one with fewer than ``min_examples`` activating
windows is skipped (``skipped_latents``) and the next is drawn, until ``n_latents`` are kept or
none remain. Three streaming passes over the activations, none holding more than one chunk of
dense latent activations: (1) activating-window counts of every latent, (2) a running top
``max_examples`` per chosen latent and its values on a seeded pool of candidate windows, (3) the
chosen windows' tokens and per-position activations. Tokens come from the tokens file at the
cached positions (row t of the activations is sequence t // kept at position skip + t % kept)
and are checked against the activations file's own token ids.

Output (HDF5, written atomically; the format engineer A's scorer reads):
file attrs ``sae_id``, ``ctx_len``, ``seed``, ``complete``; plus ``n_skipped``, ``component``,
``base_sae``, ``n_windows``, ``max_examples``, ``min_examples``.
``latents`` int64 [L]; ``tokens`` int32 [L, E, ctx_len]; ``acts`` float32 [L, E, ctx_len];
``kind`` int8 [L, E]; ``decile`` int8 [L, E] (1..10 for kind 2, else 0); extras ``window``
int64 [L, E] (window id, -1 for padding), ``n_activating`` int64 [L], ``skipped_latents`` int64.
E = n_top + 10 * n_per_decile + n_random.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch import Tensor

from saeflow import h5io
from saeflow.autointerp.h5data import dataset

KIND_PAD, KIND_TOP, KIND_DECILE, KIND_RANDOM = 0, 1, 2, 3
N_DECILES = 10

Encoder = Callable[[Tensor], Tensor]  # x [n, d] -> latent activations [n, m]


# ====================================================================== windows
@dataclass(frozen=True)
class Windows:
    """Non-overlapping windows of ``ctx_len`` cached positions in each sequence."""

    n_seq: int
    kept: int  # cached positions per sequence (ctx_len of the corpus - skip_positions)
    skip: int  # positions not cached at the start of each sequence
    ctx_len: int  # window length

    @property
    def per_seq(self) -> int:
        return self.kept // self.ctx_len

    @property
    def n(self) -> int:
        return self.n_seq * self.per_seq

    def rows(self, windows: np.ndarray) -> np.ndarray:
        """Activation rows [w, ctx_len] of window ids [w]."""
        seq, j = np.divmod(windows, self.per_seq)
        return (seq * self.kept + j * self.ctx_len)[:, None] + np.arange(self.ctx_len)

    def positions(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sequence [w], first position in the tokens file [w]) of window ids [w]."""
        seq, j = np.divmod(windows, self.per_seq)
        return seq, self.skip + j * self.ctx_len


def window_max(acts: Tensor) -> Tensor:
    """A window's activation: [w, ctx_len, L] -> max over positions [w, L]."""
    return acts.amax(dim=1)


# ====================================================================== selection (pure)
def choose_latents(counts: np.ndarray, n_latents: int, min_examples: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, skipped) latent ids: a seeded order of all latents, keeping those with at least
    ``min_examples`` activating windows until ``n_latents`` are kept. counts [m]."""
    order = np.random.default_rng(seed).permutation(len(counts))
    ok = counts[order] >= min_examples
    last = np.flatnonzero(ok)[:n_latents]
    stop = int(last[-1]) + 1 if len(last) == n_latents else len(order)
    seen = order[:stop]
    return seen[ok[:stop]].astype(np.int64), seen[~ok[:stop]].astype(np.int64)


class TopN:
    """Running top ``n`` windows per latent by activation, over chunks of windows."""

    def __init__(self, n: int, n_latents: int) -> None:
        self.n = n
        self.values = torch.empty(0, n_latents)
        self.ids = torch.empty(0, n_latents, dtype=torch.int64)

    def update(self, values: Tensor, ids: Tensor) -> None:
        """values [w, L] window activations; ids [w] window ids."""
        vals = torch.cat([self.values, values])
        every = torch.cat([self.ids, ids[:, None].expand(-1, values.shape[1])])
        top = vals.topk(min(self.n, vals.shape[0]), dim=0)
        self.values, self.ids = top.values, every.gather(0, top.indices)


class Example(NamedTuple):
    window: int
    kind: int
    decile: int


def select_examples(top_values: np.ndarray, top_ids: np.ndarray, pool_values: np.ndarray,
                    pool_ids: np.ndarray, n_top: int, n_per_decile: int, n_random: int,
                    rng: np.random.Generator) -> list[Example]:
    """One latent's examples from its top windows (values [N] sorted descending, ids [N]) and
    a seeded pool of candidate windows (values [C], ids [C], already in random order)."""
    active = top_values > 0
    ids, n_act = top_ids[active], int(active.sum())
    out = [Example(int(w), KIND_TOP, 0) for w in ids[:n_top]]
    explainer = set(ids[:n_top].tolist())
    ascending = ids[::-1]  # equal-count quantiles over the activating windows, low to high
    for q, group in enumerate(np.array_split(np.arange(n_act), N_DECILES), start=1):
        choices = [int(w) for w in ascending[group] if int(w) not in explainer]
        take = rng.choice(len(choices), min(n_per_decile, len(choices)), replace=False)
        out += [Example(choices[i], KIND_DECILE, q) for i in sorted(take)]
    zero = pool_ids[pool_values == 0][:n_random]
    return out + [Example(int(w), KIND_RANDOM, 0) for w in zero]


# ====================================================================== streaming passes
def iter_windows(acts: h5py.File, win: Windows,
                 chunk_tokens: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(window ids [w], x [w, ctx_len, d]) over the file, whole sequences per read."""
    seqs = max(1, chunk_tokens // win.kept)
    d = dataset(acts, "acts").shape[1]
    used = win.per_seq * win.ctx_len
    for s0 in range(0, win.n_seq, seqs):
        s1 = min(s0 + seqs, win.n_seq)
        x = torch.from_numpy(dataset(acts, "acts")[s0 * win.kept: s1 * win.kept])
        x = x.view(s1 - s0, win.kept, d)[:, :used].reshape(-1, win.ctx_len, d)
        yield torch.arange(s0 * win.per_seq, s1 * win.per_seq), x


def encode_windows(encoder: Encoder, x: Tensor, latents: Tensor | None) -> Tensor:
    """x [w, ctx_len, d] -> activations [w, ctx_len, L] (all latents if ``latents`` is None)."""
    w, c, d = x.shape
    z = encoder(x.reshape(w * c, d))
    if latents is not None:
        z = z.index_select(1, latents)
    return z.reshape(w, c, -1)


def count_activating(acts: h5py.File, win: Windows, encoder: Encoder, chunk: int) -> np.ndarray:
    """Pass 1: activating windows per latent [m]."""
    counts = None
    for _, x in iter_windows(acts, win, chunk):
        c = (window_max(encode_windows(encoder, x, None)) > 0).sum(0)
        counts = c if counts is None else counts + c
    assert counts is not None
    return counts.numpy()


def top_and_pool(acts: h5py.File, win: Windows, encoder: Encoder, latents: Tensor,
                 max_examples: int, pool: np.ndarray, chunk: int) -> tuple[TopN, Tensor]:
    """Pass 2: running top windows of each chosen latent, and its activation on the pool
    windows [C, L] (in pool order)."""
    top = TopN(max_examples, len(latents))
    pool_slot = torch.full((win.n,), -1, dtype=torch.int64)
    pool_slot[torch.from_numpy(pool)] = torch.arange(len(pool))
    pool_values = torch.zeros(len(pool), len(latents))
    for ids, x in iter_windows(acts, win, chunk):
        wmax = window_max(encode_windows(encoder, x, latents))  # [w, L]
        top.update(wmax, ids)
        slot = pool_slot[ids]
        pool_values[slot[slot >= 0]] = wmax[slot >= 0]
    return top, pool_values


def gather(acts: h5py.File, tokens: h5py.Dataset, win: Windows, encoder: Encoder,
           latents: Tensor, windows: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 3: (tokens [w, ctx_len] int32, activations [w, ctx_len, L]) of sorted window ids."""
    out_tok = np.zeros((len(windows), win.ctx_len), np.int32)
    out_act = np.zeros((len(windows), win.ctx_len, len(latents)), np.float32)
    step = max(1, chunk // win.ctx_len)
    for i in range(0, len(windows), step):
        part = windows[i:i + step]
        rows = win.rows(part)
        x = torch.from_numpy(dataset(acts, "acts")[rows.reshape(-1)])
        x = x.view(len(part), win.ctx_len, -1)
        out_act[i:i + step] = encode_windows(encoder, x, latents).numpy()
        seq, first = win.positions(part)
        tok = np.stack([tokens[s, f:f + win.ctx_len] for s, f in zip(seq, first)])
        cached = np.asarray(dataset(acts, "tokens")[rows.reshape(-1)]).reshape(tok.shape)
        if not np.array_equal(tok, cached):
            raise h5io.InputFileError(
                f"{acts.filename}: token ids differ from {tokens.file.filename} at the cached "
                "positions; the activations were made from another tokens file")
        out_tok[i:i + step] = tok
    return out_tok, out_act


# ====================================================================== the stage
@dataclass(frozen=True)
class ExampleConfig:
    """How many latents and examples of each kind (see the module docstring)."""

    n_latents: int = 50
    ctx_len: int = 32
    n_top: int = 10
    n_per_decile: int = 7
    n_random: int = 50
    max_examples: int = 2000
    min_examples: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_latents", "ctx_len", "max_examples", "min_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        for name in ("n_top", "n_per_decile", "n_random"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, "
                                 f"got {getattr(self, name)}")

    @property
    def per_latent(self) -> int:
        return self.n_top + N_DECILES * self.n_per_decile + self.n_random


def read_windows(acts: h5py.File, tokens: h5py.File, ctx_len: int) -> Windows:
    """The window layout of an activations file, checked against its tokens file."""
    n_seq, ctx = (int(h5io.plain(acts.attrs.get(k, -1))) for k in ("n_seq", "ctx_len"))
    skip = int(h5io.plain(acts.attrs.get("skip_positions", -1)))
    if min(n_seq, ctx, skip) < 0:
        raise h5io.InputFileError(f"{acts.filename}: attributes n_seq, ctx_len and "
                                  "skip_positions are required")
    tok_shape, n_rows = dataset(tokens, "tokens").shape, dataset(acts, "acts").shape[0]
    if tok_shape != (n_seq, ctx) or n_rows != n_seq * (ctx - skip):
        raise h5io.InputFileError(
            f"{acts.filename}: {n_rows} rows for n_seq {n_seq} x (ctx_len {ctx} - "
            f"skip {skip}), and {tokens.filename} has tokens {tok_shape}")
    if ctx_len > ctx - skip:
        raise ValueError(f"--ctx-len {ctx_len} exceeds the {ctx - skip} cached positions per "
                         f"sequence of {acts.filename}")
    return Windows(n_seq, ctx - skip, skip, ctx_len)


def collect(acts: h5py.File, tokens: h5py.File, encoder: Encoder, cfg: ExampleConfig,
            chunk: int) -> dict[str, Any]:
    """The three passes; returns the arrays of the output file."""
    win = read_windows(acts, tokens, cfg.ctx_len)
    counts = count_activating(acts, win, encoder, chunk)
    chosen, skipped = choose_latents(counts, cfg.n_latents, cfg.min_examples, cfg.seed)
    if len(chosen) == 0:
        raise ValueError(f"no latent has {cfg.min_examples} activating windows of "
                         f"{win.n}; lower --min-examples or use more tokens")
    latents = torch.from_numpy(chosen)
    pool = np.random.default_rng([cfg.seed, 1]).permutation(win.n)
    pool = pool[: min(win.n, max(4 * cfg.n_random, 256))]
    top, pool_values = top_and_pool(acts, win, encoder, latents, cfg.max_examples, pool, chunk)
    rng = np.random.default_rng([cfg.seed, 2])
    picks = [select_examples(top.values[:, i].numpy(), top.ids[:, i].numpy(),
                             pool_values[:, i].numpy(), pool, cfg.n_top, cfg.n_per_decile,
                             cfg.n_random, rng) for i in range(len(chosen))]
    every = np.unique([e.window for p in picks for e in p]).astype(np.int64)
    tok, act = gather(acts, dataset(tokens, "tokens"), win, encoder, latents, every, chunk)
    return assemble(picks, every, tok, act, cfg.per_latent, win.ctx_len) | {
        "latents": chosen, "skipped_latents": skipped, "n_activating": counts[chosen],
        "n_windows": win.n}


def assemble(picks: list[list[Example]], every: np.ndarray, tok: np.ndarray, act: np.ndarray,
             per_latent: int, ctx_len: int) -> dict[str, np.ndarray]:
    """Padded [L, E, ...] arrays; each latent's acts are its own column of ``act``."""
    n = len(picks)
    out = {"tokens": np.zeros((n, per_latent, ctx_len), np.int32),
           "acts": np.zeros((n, per_latent, ctx_len), np.float32),
           "kind": np.zeros((n, per_latent), np.int8), "decile": np.zeros((n, per_latent), np.int8),
           "window": np.full((n, per_latent), -1, np.int64)}
    for i, examples in enumerate(picks):
        for e, ex in enumerate(examples):
            j = int(np.searchsorted(every, ex.window))
            out["tokens"][i, e], out["acts"][i, e] = tok[j], act[j, :, i]
            out["kind"][i, e], out["decile"][i, e] = ex.kind, ex.decile
            out["window"][i, e] = ex.window
    return out


def write_examples(path: str, arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
    with h5io.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for name in ("latents", "tokens", "acts", "kind", "decile", "window", "n_activating",
                     "skipped_latents"):
            h5[name] = arrays[name]
        h5io.write_attrs(h5, {**attrs, "n_windows": int(arrays["n_windows"]),
                              "n_skipped": len(arrays["skipped_latents"])})
        h5io.mark_complete(h5)


def make_encoder(sae_path: str, base_path: str | None, fit_path: str | None,
                 component: str | None) -> Encoder:
    """x [n, d] -> the SAE's latents [n, m], through the base SAE's error component if given."""
    from saeflow import error_saes
    from saeflow.saes import load_sae

    sae = load_sae(sae_path)
    if base_path is None:
        return lambda x: sae.encode(x)
    if fit_path is None or component is None:
        raise ValueError("an error SAE (--base-sae) needs --fit and --component")
    base, fit = load_sae(base_path), error_saes.read_fit(fit_path, int(sae.cfg.d_in))
    recorded = (getattr(sae.cfg.metadata, "saeflow_error_sae", None) or {}).get("component")
    if recorded not in (None, component):
        raise h5io.InputFileError(f"{sae_path}/cfg.json: the SAE was trained on the {recorded} "
                                  f"component, not --component {component}")

    def encode(x: Tensor) -> Tensor:
        target = error_saes.component_of(x, error_saes.sae_error(base, x), fit,
                                         component)  # type: ignore[arg-type] (checked above)
        return sae.encode(target)

    return encode


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saeflow.autointerp.examples",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", required=True, help="activations of the evaluation corpus (.h5)")
    p.add_argument("--tokens", required=True, help="the tokens file those were made from")
    p.add_argument("--sae", required=True, help="SAE folder whose latents are explained")
    p.add_argument("--sae-id", required=True, help="its id, stored in the file")
    p.add_argument("--out", required=True, help="examples file (.h5)")
    p.add_argument("--base-sae", help="base SAE folder (the SAE is an error SAE of it)")
    p.add_argument("--fit", help="fit file of the base SAE's error map (with --base-sae)")
    p.add_argument("--component", choices=("linear", "nonlinear"), help="with --base-sae")
    for name, default in ExampleConfig().__dict__.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per streamed read")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = _parser()
    args = p.parse_args(argv)
    if (args.base_sae is None) != (args.fit is None) or (args.base_sae is None) != (
            args.component is None):
        p.error("--base-sae, --fit and --component go together")
    try:
        cfg = ExampleConfig(**{k: getattr(args, k) for k in ExampleConfig().__dict__})
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = make_encoder(args.sae, args.base_sae, args.fit, args.component)
    with torch.no_grad(), h5io.open_checked(args.acts, {"acts": (None, None), "tokens": (None,)}) \
            as acts, h5io.open_checked(args.tokens, {"tokens": (None, None)}) as tokens:
        arrays = collect(acts, tokens, encoder, cfg, max(1, args.chunk_tokens))
    attrs = {"sae_id": args.sae_id, "ctx_len": cfg.ctx_len, "seed": cfg.seed,
             "component": args.component or "", "base_sae": args.base_sae or "",
             "max_examples": cfg.max_examples, "min_examples": cfg.min_examples,
             "acts_file": args.acts, "tokens_file": args.tokens}
    write_examples(args.out, arrays, attrs)
    summary = {"latents": len(arrays["latents"]), "skipped": len(arrays["skipped_latents"]),
               "windows": int(arrays["n_windows"]),
               "padding": int((arrays["kind"] == KIND_PAD).sum())}
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
