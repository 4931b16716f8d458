"""Per-latent feature analysis as pure streaming functions over CSR chunks of active latents.

What is computed follows OpenMOSS's ``FeatureAnalyzer`` and SAEDashboard/Neuronpedia's feature
pages (reference: mlsae-openmoss-saex.md section 2, peer-systems.md section 5): activation count,
frequency and maximum, an activation histogram, the top-activating tokens, samples per
activation-interval bin ("quantile groups" in sae_vis/SAEDashboard: equal-width intervals of
[0, max], with ``bin_contains`` the fraction of activations in each), non-activating samples,
decoder norms, top +/- logits by direct logit attribution and nearest latents by decoder cosine.

Memory is bounded by the number of latents times the sample counts, never by the corpus: two
passes over the CSR arrays (the maximum fixes the bin edges of the second). Sampling is seeded
bottom-k sampling: each activation gets a uniform random key and the ``n`` smallest keys per bin
are a uniform sample without replacement (the vectorised form of reservoir sampling); the keys are
drawn in corpus order, so the result does not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm


class Chunk(NamedTuple):
    """Active latents of the tokens ``start .. start + len(counts)``, as CSR parts."""

    start: int  # first token (row) of the chunk
    counts: np.ndarray  # [n_rows] active latents per token
    idx: np.ndarray  # [nnz] latent ids, row-major
    val: np.ndarray  # [nnz] activations


def rows_of(chunk: Chunk) -> np.ndarray:
    """Token (row) of every non-zero of a chunk, [nnz] int64."""
    return chunk.start + np.repeat(np.arange(len(chunk.counts), dtype=np.int64), chunk.counts)


@dataclass
class Settings:
    """How much to keep per latent."""

    n_top: int = 10  # top-activating tokens (SAEDashboard top_acts_group_size is 20)
    n_bins: int = 5  # activation-interval groups (SAEDashboard n_quantiles 5)
    n_per_bin: int = 5  # samples per group (SAEDashboard quantile_group_size 5)
    n_nonact: int = 10  # non-activating tokens (OpenMOSS non_activating n_samples 20)
    n_hist: int = 32  # histogram bins over [0, max]
    seed: int = 0


@dataclass
class LatentStats:
    """Streaming results of one corpus, per latent (``m`` latents, ``n_tokens`` tokens)."""

    n_tokens: int
    count: np.ndarray  # [m] int64 tokens on which the latent fires
    max: np.ndarray  # [m] float32 (0 for dead latents)
    act_sum: np.ndarray  # [m] float64
    hist: np.ndarray  # [m, n_hist] int64 counts over linspace(0, max, n_hist + 1)
    top_val: np.ndarray  # [m, n_top] float32, descending; -inf where fewer activations
    top_row: np.ndarray  # [m, n_top] int64; -1 where missing
    bin_row: np.ndarray  # [m, n_bins, n_per_bin] int64 sampled tokens per interval; -1 missing
    bin_val: np.ndarray  # [m, n_bins, n_per_bin] float32
    bin_count: np.ndarray  # [m, n_bins] int64 activations per interval
    nonact_row: np.ndarray  # [m, n_nonact] int64 tokens where the latent is 0; -1 missing

    @property
    def freq(self) -> np.ndarray:
        return self.count / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> np.ndarray:
        return np.divide(self.act_sum, self.count, out=np.zeros(len(self.count)),
                         where=self.count > 0)


def smallest_per_group(keys: np.ndarray, group: np.ndarray, n_groups: int,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """Position of the ``k`` smallest keys in each group: ([n_groups, k] index into keys, -1 if
    missing; [n_groups, k] keys, +inf if missing). Ties broken by position (stable)."""
    order = np.lexsort((keys, group))  # by group, then key; lexsort is stable
    g = group[order]
    starts = np.searchsorted(g, np.arange(n_groups))
    rank = np.arange(len(order)) - starts[g]
    keep = rank < k
    pos = np.full((n_groups, k), -1, dtype=np.int64)
    best = np.full((n_groups, k), np.inf)
    pos[g[keep], rank[keep]] = order[keep]
    best[g[keep], rank[keep]] = keys[order[keep]]
    return pos, best


def merge_smallest(keys_a: np.ndarray, keys_b: np.ndarray, *pairs: tuple[np.ndarray, np.ndarray]
                   ) -> tuple[np.ndarray, ...]:
    """Row-wise ``k`` smallest of two [g, k] key arrays, and the same selection of each (a, b)
    pair of payload arrays (stable: a before b)."""
    keys = np.concatenate([keys_a, keys_b], axis=1)
    order = np.argsort(keys, axis=1, kind="stable")[:, : keys_a.shape[1]]
    picked = [np.take_along_axis(np.concatenate(p, axis=1), order, 1) for p in pairs]
    return (np.take_along_axis(keys, order, 1), *picked)


def first_pass(chunks: Iterable[Chunk], d_sae: int) -> tuple[int, np.ndarray, np.ndarray,
                                                              np.ndarray]:
    """Tokens, count [m], max [m] and activation sum [m] in one pass."""
    count = np.zeros(d_sae, np.int64)
    vmax = np.zeros(d_sae, np.float32)
    act_sum = np.zeros(d_sae, np.float64)
    n = 0
    for chunk in chunks:
        n = chunk.start + len(chunk.counts)
        count += np.bincount(chunk.idx, minlength=d_sae)
        np.maximum.at(vmax, chunk.idx, chunk.val)
        act_sum += np.bincount(chunk.idx, weights=chunk.val, minlength=d_sae)
    return n, count, vmax, act_sum


def interval_bin(val: np.ndarray, vmax: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width interval of (0, vmax] holding each value, 0 .. n_bins - 1."""
    frac = val / np.where(vmax > 0, vmax, 1.0)
    return np.clip(np.ceil(frac * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


class _Samplers:
    """State of the second pass: histogram, top tokens, interval samples."""

    def __init__(self, vmax: np.ndarray, s: Settings) -> None:
        m = len(vmax)
        self.vmax, self.s, self.rng = vmax, s, np.random.default_rng(s.seed)
        self.hist = np.zeros((m, s.n_hist), np.int64)
        self.top_key = np.full((m, s.n_top), np.inf)
        self.top_row = np.full((m, s.n_top), -1, np.int64)
        self.bin_key = np.full((m * s.n_bins, s.n_per_bin), np.inf)
        self.bin_row = np.full((m * s.n_bins, s.n_per_bin), -1, np.int64)
        self.bin_val = np.zeros((m * s.n_bins, s.n_per_bin), np.float32)
        self.bin_count = np.zeros(m * s.n_bins, np.int64)

    def update(self, chunk: Chunk) -> None:
        s, m = self.s, len(self.vmax)
        rows, idx = rows_of(chunk), chunk.idx.astype(np.int64)
        val = chunk.val.astype(np.float64)
        hbin = interval_bin(val, self.vmax[idx], s.n_hist)
        np.add.at(self.hist, (idx, hbin), 1)
        # top tokens: the smallest -value keys; ties go to the earlier token
        pos, key = smallest_per_group(-val, idx, m, s.n_top)
        cand = np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
        self.top_key, self.top_row = merge_smallest(self.top_key, key, (self.top_row, cand))
        group = idx * s.n_bins + interval_bin(val, self.vmax[idx], s.n_bins)
        self.bin_count += np.bincount(group, minlength=m * s.n_bins)
        pos, key = smallest_per_group(self.rng.random(len(val)), group, m * s.n_bins, s.n_per_bin)
        cand = np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
        cval = np.where(pos >= 0, val[np.maximum(pos, 0)], 0.0).astype(np.float32)
        self.bin_key, self.bin_row, self.bin_val = merge_smallest(
            self.bin_key, key, (self.bin_row, cand), (self.bin_val, cval))


def nonact_candidates(n_tokens: int, d_sae: int, n_nonact: int, seed: int,
                      oversample: int = 4) -> np.ndarray:
    """Sorted random tokens per latent [m, oversample * n_nonact], drawn before the pass; the first
    ``n_nonact`` distinct ones on which the latent stays 0 are a uniform sample of its
    non-activating tokens (rejection sampling; a latent firing on more than ~3/4 of the tokens can
    come up short, which only dense latents do)."""
    rng = np.random.default_rng([seed, 1])
    cand = rng.integers(0, max(n_tokens, 1), (d_sae, oversample * n_nonact))
    return cand  # order is the draw order: keeps the sample uniform when truncated


def mark_active(cand: np.ndarray, active: np.ndarray, chunk: Chunk, n_tokens: int) -> None:
    """Set ``active[l, j]`` where candidate token ``cand[l, j]`` is one where latent l fires."""
    keys = chunk.idx.astype(np.int64) * n_tokens + rows_of(chunk)
    keys.sort()
    want = np.arange(cand.shape[0])[:, None] * n_tokens + cand
    pos = np.clip(np.searchsorted(keys, want), 0, max(len(keys) - 1, 0))
    if len(keys):
        active |= keys[pos] == want


def pick_nonact(cand: np.ndarray, active: np.ndarray, n_nonact: int) -> np.ndarray:
    """First ``n_nonact`` distinct inactive candidates per latent [m, n_nonact], -1 padded."""
    out = np.full((cand.shape[0], n_nonact), -1, np.int64)
    for latent in range(cand.shape[0]):
        rows = cand[latent][~active[latent]]
        _, first = np.unique(rows, return_index=True)
        picked = rows[np.sort(first)][:n_nonact]
        out[latent, : len(picked)] = picked
    return out


def latent_stats(chunks_factory, d_sae: int, s: Settings) -> LatentStats:
    """Both passes. ``chunks_factory()`` yields the corpus's chunks afresh for each pass."""
    n, count, vmax, act_sum = first_pass(chunks_factory(), d_sae)
    samplers = _Samplers(vmax, s)
    cand = nonact_candidates(n, d_sae, s.n_nonact, s.seed)
    active = np.zeros(cand.shape, bool)
    for chunk in chunks_factory():
        samplers.update(chunk)
        mark_active(cand, active, chunk, n)
    bin_row = samplers.bin_row.reshape(d_sae, s.n_bins, s.n_per_bin)
    return LatentStats(
        n_tokens=n, count=count, max=vmax, act_sum=act_sum, hist=samplers.hist,
        top_val=np.where(samplers.top_row >= 0, -samplers.top_key, -np.inf).astype(np.float32), top_row=samplers.top_row,
        bin_row=bin_row, bin_val=samplers.bin_val.reshape(bin_row.shape),
        bin_count=samplers.bin_count.reshape(d_sae, s.n_bins),
        nonact_row=pick_nonact(cand, active, s.n_nonact))


class Windows(NamedTuple):
    """Context windows of sampled tokens: per sample, the tokens around it and one latent's
    activation on each."""

    rows: np.ndarray  # [S, W] int64 token rows, -1 padding
    acts: np.ndarray  # [S, W] float32 activation of the sample's latent


def window_rows(center: np.ndarray, seq_len: int, before: int, after: int) -> np.ndarray:
    """Rows [S, before + 1 + after] around each centre row, within its sequence (-1 outside).
    Row t belongs to sequence t // seq_len (the activation files' layout, saeflow.h5io)."""
    offsets = np.arange(-before, after + 1)
    rows = center[:, None] + offsets[None, :]
    same = (rows // seq_len == center[:, None] // seq_len) & (rows >= 0) & (center[:, None] >= 0)
    return np.where(same, rows, -1)


def gather_acts(chunks: Iterable[Chunk], rows: np.ndarray, latent: np.ndarray,
                d_sae: int) -> np.ndarray:
    """Activation of ``latent[s]`` at every ``rows[s, w]`` [S, W] (0 where inactive or padded),
    in one sequential pass: the wanted (row, latent) keys are sorted and looked up per chunk."""
    want = np.where(rows >= 0, rows * d_sae + latent[:, None], -1).ravel()
    order = np.argsort(want, kind="stable")
    sorted_want = want[order]
    out = np.zeros(want.shape, np.float32)
    for chunk in chunks:
        keys = rows_of(chunk) * d_sae + chunk.idx  # row-major, so sorted if ids sorted per row
        key_order = np.argsort(keys, kind="stable")
        keys = keys[key_order]
        lo, hi = np.searchsorted(sorted_want, [keys[0], keys[-1] + 1]) if len(keys) else (0, 0)
        if hi <= lo:
            continue
        seg = sorted_want[lo:hi]
        pos = np.clip(np.searchsorted(keys, seg), 0, len(keys) - 1)
        hit = keys[pos] == seg
        out[order[lo:hi][hit]] = chunk.val[key_order][pos[hit]]
    return out.reshape(rows.shape)


class Logits(NamedTuple):
    """Direct logit attribution of each latent's decoder direction."""

    pos_ids: torch.Tensor  # [m, k] token ids with the largest W_dec · W_U
    pos_val: torch.Tensor  # [m, k]
    neg_ids: torch.Tensor  # [m, k] the most negative
    neg_val: torch.Tensor  # [m, k]


def top_logits(w_dec: torch.Tensor, w_u: torch.Tensor, k: int, chunk: int = 512) -> Logits:
    """Top +/- k of ``w_dec`` [m, d] @ ``w_u`` [d, V], ``chunk`` latents at a time (the full
    [m, V] product of a 9k-latent SAE and a 49k vocabulary is 1.8 GB)."""
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, w_dec.shape[0], chunk):
        prod = w_dec[start : start + chunk].float() @ w_u.float()
        pos, neg = prod.topk(k, dim=1), prod.topk(k, dim=1, largest=False)
        parts.append((pos.indices, pos.values, neg.indices, neg.values))
    return Logits(*(torch.cat(p) for p in zip(*parts, strict=True)))


class Neighbours(NamedTuple):
    ids: torch.Tensor  # [m, k] latents with the most similar decoder direction
    cos: torch.Tensor  # [m, k] their cosine similarity


def nearest_latents(w_dec: torch.Tensor, k: int, chunk: int = 1024) -> Neighbours:
    """The ``k`` latents of largest decoder cosine with each latent, itself excluded."""
    unit = torch.nn.functional.normalize(w_dec.float(), dim=1)
    k = min(k, unit.shape[0] - 1)
    ids, cos = [], []
    for start in range(0, unit.shape[0], chunk):
        sim = unit[start : start + chunk] @ unit.T
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -torch.inf
        top = sim.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return Neighbours(torch.cat(ids), torch.cat(cos))


def iter_csr(ptr, idx, val, chunk_tokens: int, desc: str = "") -> Iterator[Chunk]:
    """Chunks of a CSR triple (arrays or lazily read HDF5 datasets), with a progress bar."""
    n = len(ptr) - 1
    for start in tqdm(range(0, n, chunk_tokens), desc=desc, unit="chunk", disable=not desc):
        p = np.asarray(ptr[start : min(start + chunk_tokens, n) + 1])
        yield Chunk(start, np.diff(p), np.asarray(idx[p[0] : p[-1]]),
                    np.asarray(val[p[0] : p[-1]]))
