"""Auto-interpretation scoring: parse the LLM's answers and pool them into per-decile counts.

Pure functions only (no I/O). Conventions follow sae-auto-interp's ``RecallScorer`` as used for
Figure 8 of the Dark Matter paper (reference A4): an answer that cannot be parsed is dropped
(the original stored -1 and ignored it) and counted; recall is computed per activation decile
(1..10, 10 = highest) over the pooled counts of all latents; the "Not" column is 1 - false-positive
rate on random non-activating examples; error bars are Wald intervals ±1.96·sqrt(p(1-p)/n).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

N_DECILES = 10
Z95 = 1.959963984540054

_TAG = re.compile(r"\[?\s*explanation\s*\]?\s*:\s*(.*)", re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z]*")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def parse_explanation(text: str | None) -> str | None:
    """The explanation in an explainer answer, or None if there is nothing usable.

    The prompt asks for one line ``[EXPLANATION]: ...``. Small models often skip the tag, so
    without it the first non-empty line is taken (models that answer well are unaffected).
    """
    if not text:
        return None
    lines = [line.strip() for line in _FENCE.sub("", text).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        match = _TAG.search(line)
        if match:  # the tag's line, or the line after a bare tag
            return _clean(match.group(1)) or (_clean(lines[i + 1]) if i + 1 < len(lines) else None)
    return _clean(lines[0]) if lines else None


def _clean(text: str) -> str | None:
    """Strip whitespace and quotes or bold marks that wrap the whole text (not inner ones)."""
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`*":
        text = text[1:-1].strip()
    return text or None


def _binary(token: str) -> int | None:
    token = token.strip().strip("\"'").lower()
    if token in _TRUE:
        return 1
    if token in _FALSE:
        return 0
    return None


def _as_binary_list(body: str, n: int) -> list[int] | None:
    parts = [p for p in re.split(r"[,\s]+", body.strip()) if p]
    values = [_binary(p) for p in parts]
    if len(values) != n or any(v is None for v in values):
        return None
    return values  # type: ignore[return-value]


def parse_binary_list(text: str | None, n: int) -> list[int] | None:
    """A list of exactly ``n`` 0/1 values from a scorer answer, or None if unparseable.

    Accepts ``[1, 0, 1]``, code fences, ``True/False``, quoted values, extra text around the list
    and a bare ``1, 0, 1``. The first bracketed list made only of 0/1 values decides; a list of
    the wrong length is unparseable (guessing which examples it meant would bias recall).
    """
    if not text or n < 1:
        return None
    body = _FENCE.sub(" ", text)
    for match in _BRACKETED.finditer(body):
        inner = match.group(1)
        if not inner.strip():
            continue
        values = _as_binary_list(inner, len([p for p in re.split(r"[,\s]+", inner.strip()) if p]))
        if values is not None:
            return values if len(values) == n else None
    try:  # a Python literal such as (1, 0) that the regex did not catch
        literal = ast.literal_eval(body.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        literal = None
    if isinstance(literal, list | tuple):
        return _as_binary_list(",".join(str(v) for v in literal), n)
    return _as_binary_list(body, n)


class DecileCounts(NamedTuple):
    """Counts of "predicted active" answers, pooled over examples (and latents).

    positives, totals: int64 [10], index i = decile i + 1 (10 = highest activations).
    neg_positives, neg_totals: the same for random non-activating examples.
    """

    positives: np.ndarray
    totals: np.ndarray
    neg_positives: int
    neg_totals: int


def count_predictions(predictions: Sequence[int | None],
                      deciles: Sequence[int]) -> DecileCounts:
    """Per-decile counts from one latent's answers.

    predictions[i] is 1/0, or None when the answer was unparseable or failed (left out, as the
    original's -1); deciles[i] is 1..10 for an activating test example, 0 for non-activating.
    """
    if len(predictions) != len(deciles):
        raise ValueError(f"{len(predictions)} predictions for {len(deciles)} examples")
    positives = np.zeros(N_DECILES, np.int64)
    totals = np.zeros(N_DECILES, np.int64)
    neg_pos = neg_tot = 0
    for pred, decile in zip(predictions, deciles):
        if pred is None:
            continue
        if not 0 <= decile <= N_DECILES:
            raise ValueError(f"decile {decile} outside 0..{N_DECILES}")
        if decile == 0:
            neg_pos, neg_tot = neg_pos + int(pred), neg_tot + 1
        else:
            positives[decile - 1] += int(pred)
            totals[decile - 1] += 1
    return DecileCounts(positives, totals, neg_pos, neg_tot)


def pool_counts(counts: Iterable[DecileCounts]) -> DecileCounts:
    """Sum counts over latents (the original pooled examples, not per-latent rates)."""
    positives = np.zeros(N_DECILES, np.int64)
    totals = np.zeros(N_DECILES, np.int64)
    neg_pos = neg_tot = 0
    for c in counts:
        positives += np.asarray(c.positives, np.int64)
        totals += np.asarray(c.totals, np.int64)
        neg_pos, neg_tot = neg_pos + int(c.neg_positives), neg_tot + int(c.neg_totals)
    return DecileCounts(positives, totals, neg_pos, neg_tot)


class Interval(NamedTuple):
    """A binomial proportion k/n with its 95% intervals (nan when n = 0)."""

    p: float
    n: int
    wald_half: float  # ±1.96·sqrt(p(1-p)/n), the original's error bar
    wilson_lo: float
    wilson_hi: float


def binomial_interval(k: int, n: int, z: float = Z95) -> Interval:
    """Wald half-width (as the original plots) and the Wilson score interval of k successes in n."""
    if n <= 0:
        return Interval(math.nan, 0, math.nan, math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes out of n={n}")
    p = k / n
    wald = z * math.sqrt(p * (1 - p) / n)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, n, wald, centre - half, centre + half)


def recall_per_decile(counts: DecileCounts) -> list[Interval]:
    """Recall (fraction predicted active) of each decile 1..10."""
    return [binomial_interval(int(k), int(n)) for k, n in zip(counts.positives, counts.totals)]


def false_positive_rate(counts: DecileCounts) -> Interval:
    """Fraction of non-activating examples predicted active."""
    return binomial_interval(counts.neg_positives, counts.neg_totals)


def specificity(counts: DecileCounts) -> Interval:
    """1 - FPR, the figure's "Not" column (same Wald half-width, mirrored Wilson interval)."""
    fpr = false_positive_rate(counts)
    return Interval(1 - fpr.p, fpr.n, fpr.wald_half, 1 - fpr.wilson_hi, 1 - fpr.wilson_lo)


def figure_rows(counts: DecileCounts) -> list[dict]:
    """One row per x position of Figure 8: "Not" (1 - FPR), then Q1..Q10 (recall)."""
    rows = []
    for label, k, iv in [("Not", counts.neg_totals - counts.neg_positives, specificity(counts))] + [
        (f"Q{d + 1}", int(counts.positives[d]), iv)
        for d, iv in enumerate(recall_per_decile(counts))
    ]:
        rows.append({"x": label, "k": int(k), "n": iv.n, "value": _num(iv.p),
                     "wald_half": _num(iv.wald_half),
                     "wilson_lo": _num(iv.wilson_lo), "wilson_hi": _num(iv.wilson_hi)})
    return rows


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int | None]) -> float | None:
    """(recall + specificity) / 2 over answered examples; None if a class has none."""
    pos = [p for y, p in zip(labels, predictions) if y == 1 and p is not None]
    neg = [p for y, p in zip(labels, predictions) if y == 0 and p is not None]
    if not pos or not neg:
        return None
    return 0.5 * (sum(pos) / len(pos) + (len(neg) - sum(neg)) / len(neg))


def _num(value: float) -> float | None:
    """JSON has no nan: an empty cell is null."""
    return None if math.isnan(value) else float(value)
