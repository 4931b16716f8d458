"""Every prompt of the auto-interpretation stage, in one place.

The explainer sees top-activating examples with the firing tokens marked ``<<like this>>`` and
answers one line ``[EXPLANATION]: ...`` (sae-auto-interp's ``SimpleExplainer``). The detection
scorer sees the explanation and a batch of unmarked examples and answers a Python list of 0/1,
one per example (``RecallScorer``, used for Figure 8). The fuzzing scorer sees marked examples and
answers, per example, whether the marked tokens are the ones the explanation describes (delphi's
``FuzzingScorer``). Prompts are short on purpose: a local CPU server pays for every prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence

Messages = list[dict[str, str]]

OPEN, CLOSE = "<<", ">>"

EXPLAINER_SYSTEM = (
    "You are a meticulous AI researcher studying a neuron of a language model. You will see text "
    f"examples in which the neuron fires; the tokens where it fires are marked {OPEN}like this{CLOSE}. "
    "Find what the marked tokens have in common, looking at the marked tokens first and their "
    "context second. Answer with one short line of the form\n[EXPLANATION]: <your explanation>"
)

DETECTION_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a feature of "
    'text, such as "male pronouns" or "text about sport", and several numbered text examples. For '
    "each example in turn, answer 1 if it contains the feature and 0 if it does not. Answer only "
    "with a Python list of 0/1 values, one per example, for instance [1, 0, 0]."
)

FUZZING_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a feature of "
    f"text and several numbered text examples in which some tokens are marked {OPEN}like this{CLOSE}. "
    "For each example in turn, answer 1 if the marked tokens are correctly marked, that is they "
    "are instances of the feature, and 0 if they are not. Answer only with a Python list of 0/1 "
    "values, one per example, for instance [1, 0, 0]."
)


def mark_tokens(pieces: Sequence[str], marked: Sequence[bool]) -> str:
    """Join decoded token strings, wrapping each run of marked tokens in one ``<<...>>``.

    pieces[i] is the text of token i (leading space included); marked[i] says whether it fires.
    A run's leading whitespace stays outside the marks, so `` <<cat>>`` rather than ``<< cat>>``.
    """
    if len(pieces) != len(marked):
        raise ValueError(f"{len(pieces)} tokens but {len(marked)} marks")
    out: list[str] = []
    run: list[str] = []
    for piece, is_marked in zip(list(pieces) + [""], list(marked) + [False]):
        if is_marked:
            run.append(piece)
            continue
        if run:
            text = "".join(run)
            stripped = text.lstrip()
            out.append(text[: len(text) - len(stripped)] + OPEN + stripped + CLOSE)
            run = []
        out.append(piece)
    return "".join(out)


def _numbered(examples: Sequence[str]) -> str:
    return "\n".join(f"Example {i + 1}: {text.strip()}" for i, text in enumerate(examples))


def _explain_user(examples: Sequence[str]) -> str:
    return f"{_numbered(examples)}\n\nWhat do the marked tokens have in common?"


def _score_user(explanation: str, examples: Sequence[str]) -> str:
    return (f"Feature: {explanation}\n\n{_numbered(examples)}\n\n"
            f"Answer with a Python list of {len(examples)} values (0 or 1).")


# One worked exchange per scorer, as delphi's scorer prompts carry: judges copy the answer's
# form. Not for the explainer: SmolLM2-135M copied a demo explanation verbatim for every latent
# (measured on the local server), which would silently give all latents one explanation.
DETECTION_DEMO = ("names of animals", ["My dog chased the ball.", "It rained all day.",
                                       "A cat sat on the mat."], "[1, 0, 1]")
FUZZING_DEMO = ("names of animals", ["My <<dog>> chased the ball.", "It <<rained>> all day.",
                                     "A <<cat>> sat on the mat."], "[1, 0, 1]")


def _with_demo(system: str, demo_user: str, demo_answer: str, user: str) -> Messages:
    return [{"role": "system", "content": system}, {"role": "user", "content": demo_user},
            {"role": "assistant", "content": demo_answer}, {"role": "user", "content": user}]


def explainer_messages(examples: Sequence[str]) -> Messages:
    """Ask for an explanation of a latent from its top-activating examples (tokens marked)."""
    return [{"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": _explain_user(examples)}]


def detection_messages(explanation: str, examples: Sequence[str]) -> Messages:
    """Ask which of ``examples`` (unmarked) contain the feature ``explanation`` describes."""
    feature, demo, answer = DETECTION_DEMO
    return _with_demo(DETECTION_SYSTEM, _score_user(feature, demo), answer,
                      _score_user(explanation, examples))


def fuzzing_messages(explanation: str, examples: Sequence[str]) -> Messages:
    """Ask, for each marked example, whether its marked tokens match ``explanation``."""
    feature, demo, answer = FUZZING_DEMO
    return _with_demo(FUZZING_SYSTEM, _score_user(feature, demo), answer,
                      _score_user(explanation, examples))


# One window per prompt, answered by one word whose probability is read (method "logprob",
# saeflow.autointerp.judge): no list to copy and no demo answer to echo.
YES_NO_SYSTEM = (
    "You are a meticulous linguistics researcher. You will be given a feature of text and one "
    "text example. Answer yes if the example contains the feature and no if it does not. "
    "Answer with one word: yes or no."
)
FUZZING_YES_NO_SYSTEM = (
    "You are a meticulous linguistics researcher. You will be given a feature of text and one "
    f"text example in which some tokens are marked {OPEN}like this{CLOSE}. Answer yes if the "
    "marked tokens are instances of the feature and no if they are not. Answer with one word: "
    "yes or no."
)


def yes_no_messages(explanation: str, example: str, fuzzing: bool = False) -> Messages:
    """Ask whether one example (marked for fuzzing) shows the feature; answer yes or no."""
    question = ("Are the marked tokens instances of the feature?" if fuzzing
                else "Does the example contain the feature?")
    return [{"role": "system", "content": FUZZING_YES_NO_SYSTEM if fuzzing else YES_NO_SYSTEM},
            {"role": "user", "content": f"Feature: {explanation}\n\nExample: {example.strip()}"
                                        f"\n\n{question} Answer yes or no."}]
