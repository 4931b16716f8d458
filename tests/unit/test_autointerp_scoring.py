"""Answer parsing on real-looking LLM answers, and the per-decile math against hand-computed cases."""

import math

import numpy as np
import pytest

from saeflow.autointerp import prompts, scoring


@pytest.mark.parametrize("answer, n, expected", [
    ("[1, 0, 1, 0, 0]", 5, [1, 0, 1, 0, 0]),
    ("[1,0,1]", 3, [1, 0, 1]),
    ("  [ 1 , 0 ]\n", 2, [1, 0]),
    ("```python\n[0, 0, 1, 1]\n```", 4, [0, 0, 1, 1]),
    ("Sure! Here is my answer: [1, 1, 0]. Example 2 matches too.", 3, [1, 1, 0]),
    ("[True, False, True]", 3, [1, 0, 1]),
    ("['1', '0']", 2, [1, 0]),
    ("[true, false]", 2, [1, 0]),
    ("1, 0, 1", 3, [1, 0, 1]),
    ("1 0 1 1", 4, [1, 0, 1, 1]),
    ("(1, 0)", 2, [1, 0]),
    ("[Example 1] is about sport: [0, 1]", 2, [0, 1]),  # first all-binary list decides
    # unparseable -> None
    ("[1, 0, 1]", 4, None),  # wrong length: never guess which example was meant
    ("[1, 0, 1, 0, 0, 1]", 5, None),
    ("[1, 2, 0]", 3, None),
    ("Example 1: I live in Paris.\n\nExample 2: The cat sat.", 2, None),  # SmolLM2, really
    ("", 3, None),
    (None, 3, None),
    ("[]", 1, None),
    ("The answer is yes.", 1, None),
    ("[0.5, 1]", 2, None),
])
def test_parse_binary_list(answer, n, expected):
    assert scoring.parse_binary_list(answer, n) == expected


@pytest.mark.parametrize("answer, expected", [
    ("[EXPLANATION]: the word \"government\" in news", 'the word "government" in news'),
    ("Looking at the marked tokens...\n[EXPLANATION]: Names of cities.", "Names of cities."),
    ("[explanation]:   male pronouns  ", "male pronouns"),
    ("EXPLANATION: dates", "dates"),
    ("```\n[EXPLANATION]: `code` tokens\n```", "`code` tokens"),
    ('[EXPLANATION]: "the word \"he\""', 'the word \"he\"'),
    ("[EXPLANATION]: **Names of rivers**", "Names of rivers"),
    # no tag: the first non-empty line (small models skip the tag)
    ("\n\nThe feature detects a \"cat\" as the subject.\nMore text.",
     'The feature detects a "cat" as the subject.'),
    ("[EXPLANATION]:\nwords about money", "words about money"),  # the line after a bare tag
    ("[EXPLANATION]:", None),  # a bare tag alone: nothing to score
    ("", None),
    (None, None),
    ("   \n  ", None),
])
def test_parse_explanation(answer, expected):
    assert scoring.parse_explanation(answer) == expected


def test_count_and_pool_by_hand():
    # latent A: decile 10 twice (1, 1), decile 1 once (0), non-activating 3x (1, 0, None)
    a = scoring.count_predictions([1, 1, 0, 1, 0, None], [10, 10, 1, 0, 0, 0])
    assert a.positives[9] == 2 and a.totals[9] == 2
    assert a.positives[0] == 0 and a.totals[0] == 1
    assert (a.neg_positives, a.neg_totals) == (1, 2)  # None left out, as the original's -1
    # latent B: decile 10 once (0), decile 5 once (1), unparseable decile 5, non-act once (0)
    b = scoring.count_predictions([0, 1, None, 0], [10, 5, 5, 0])
    pooled = scoring.pool_counts([a, b])
    assert pooled.positives.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 2]
    assert pooled.totals.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 0, 3]
    assert (pooled.neg_positives, pooled.neg_totals) == (1, 3)
    recall = scoring.recall_per_decile(pooled)
    assert recall[9].p == pytest.approx(2 / 3) and recall[9].n == 3
    assert math.isnan(recall[1].p) and recall[1].n == 0
    assert scoring.false_positive_rate(pooled).p == pytest.approx(1 / 3)
    assert scoring.specificity(pooled).p == pytest.approx(2 / 3)


def test_count_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 3 examples"):
        scoring.count_predictions([1, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="decile 11"):
        scoring.count_predictions([1], [11])


def test_binomial_interval_by_hand():
    iv = scoring.binomial_interval(8, 10)
    assert iv.p == 0.8
    assert iv.wald_half == pytest.approx(1.959964 * math.sqrt(0.8 * 0.2 / 10), rel=1e-6)
    # Wilson 95% for 8/10, from the closed form: (0.4902, 0.9433)
    assert iv.wilson_lo == pytest.approx(0.4902, abs=1e-4)
    assert iv.wilson_hi == pytest.approx(0.9433, abs=1e-4)
    edge = scoring.binomial_interval(0, 20)
    assert edge.wald_half == 0.0 and edge.wilson_lo == pytest.approx(0.0, abs=1e-12)
    assert 0 < edge.wilson_hi < 0.2
    assert math.isnan(scoring.binomial_interval(0, 0).p)
    with pytest.raises(ValueError):
        scoring.binomial_interval(5, 3)


def test_wilson_covers_truth_at_about_95_percent():
    """Wilson coverage on a seeded simulation: a property a wrong formula breaks."""
    rng = np.random.default_rng(0)
    p, n = 0.3, 40
    ks = rng.binomial(n, p, size=4000)
    covered = np.mean([(iv := scoring.binomial_interval(int(k), n)).wilson_lo <= p <= iv.wilson_hi
                       for k in ks])
    assert 0.93 < covered < 0.97


def test_figure_rows_not_column_first():
    counts = scoring.DecileCounts(np.arange(10), np.full(10, 10), 2, 8)
    rows = scoring.figure_rows(counts)
    assert [r["x"] for r in rows] == ["Not"] + [f"Q{i}" for i in range(1, 11)]
    assert rows[0]["value"] == pytest.approx(0.75) and rows[0]["k"] == 6 and rows[0]["n"] == 8
    assert rows[0]["wald_half"] == pytest.approx(1.959964 * math.sqrt(0.25 * 0.75 / 8), rel=1e-6)
    assert rows[0]["wilson_lo"] < 0.75 < rows[0]["wilson_hi"]
    assert [r["value"] for r in rows[1:]] == pytest.approx([i / 10 for i in range(10)])
    empty = scoring.figure_rows(scoring.DecileCounts(np.zeros(10), np.zeros(10), 0, 0))
    assert all(r["value"] is None for r in empty)


def test_mark_tokens_merges_runs_and_keeps_spaces_outside():
    pieces = ["The", " big", " cat", " sat", "."]
    assert prompts.mark_tokens(pieces, [False, True, True, False, True]) == \
        "The <<big cat>> sat<<.>>"
    assert prompts.mark_tokens(pieces, [False] * 5) == "The big cat sat."
    with pytest.raises(ValueError):
        prompts.mark_tokens(pieces, [True])


def test_prompts_number_examples_and_ask_for_n_values():
    msgs = prompts.detection_messages("cities", ["Paris is big.", "A cat."])
    user = msgs[-1]["content"]
    assert "Feature: cities" in user and "Example 2: A cat." in user
    assert "list of 2 values" in user
    assert msgs[0]["role"] == "system" and "Python list" in msgs[0]["content"]
    explain = prompts.explainer_messages(["The <<river>> rose."])
    assert "[EXPLANATION]:" in explain[0]["content"] and "<<river>>" in explain[-1]["content"]
    assert [m["role"] for m in explain] == ["system", "user"]  # no demo to copy
    for msgs in (prompts.detection_messages("rivers", ["The Rhine rose."]),
                 prompts.fuzzing_messages("rivers", ["The <<Rhine>> rose."])):
        # one worked exchange, then the real question; the demo answer parses
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
        assert scoring.parse_binary_list(msgs[2]["content"], 3) == [1, 0, 1]


def test_balanced_accuracy_ignores_unanswered_and_needs_both_classes():
    from saeflow.autointerp.scoring import balanced_accuracy

    assert balanced_accuracy([1, 1, 0, 0, 1], [1, 0, 0, None, None]) == 0.75
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 1, 1]) == 0.5
    assert balanced_accuracy([1, 0], [1, None]) is None
