"""Stage: explain every latent of an examples file with an LLM, then score the explanations.

``python -m saeflow.autointerp.score --examples EXAMPLES.h5 --tokenizer MODEL_DIR
--out results.jsonl --summary summary.json --cache cache.jsonl
[--server local --model-dir DIR | --base-url URL --model NAME [--api-key-env VAR]]
[--concurrency 4] [--timeout 60] [--max-retries 4] [--n-explain 10] [--examples-per-prompt 5]
[--seed 0] [--server-log PATH] [--server-threads N] [--server-continuous-batching]
[--max-failed-fraction 0.1] [--method list|logprob]``

``--method logprob`` replaces each list prompt by one yes/no prompt per example and predicts 1
when log P(yes) > log P(no) (:mod:`saeflow.autointerp.judge`); with ``--server local`` the model
is loaded in this process (``transformers serve`` returns no logprobs), with a remote server its
``top_logprobs`` are read. Records then carry each example's ``margin``.

Per latent: one explainer request on its top ``--n-explain`` examples (kind 1, firing tokens
marked), then the detection scorer (unmarked decile and non-activating examples, is the feature
there?) and the fuzzing scorer (decile examples with their true firing tokens marked, and
non-activating examples with as many random tokens marked: is the marking right?), each in
batches of ``--examples-per-prompt`` shuffled with a per-latent seed. Answers come from the cache
when present, so a rerun only asks what is missing; a run whose failed requests exceed
``--max-failed-fraction`` of its calls exits with an error before writing outputs (rerun it:
answers received so far are cached).

Outputs, written atomically:

``results.jsonl``: one record per latent, in file order::

    {"latent": int, "explanation": str | null, "explanation_answer": raw answer | null,
     "detection": SCORER, "fuzzing": SCORER}
    SCORER = {"example": [slot in the file's E axis], "decile": [1..10, 0 = non-activating],
              "label": [1 activating / 0 not], "prediction": [1 | 0 | null (unparseable/failed)],
              "decile_positives": [10 ints, index i = decile i+1], "decile_totals": [10 ints],
              "nonactivating_positives": int, "nonactivating_totals": int,
              "prompts": int, "unparseable": int (answers), "failed": int (requests)}

A latent whose explanation failed has ``explanation`` null and empty scorers.

``summary.json``: latents and latents scored, client counts (requests sent, cache hits, retries,
failures, error kinds), per scorer the unparseable rate and pooled ``rows`` (x = Not, Q1..Q10:
1 - FPR, then recall per decile, with Wald half-widths and Wilson intervals), and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from saeflow import h5io
from saeflow.autointerp import prompts, scoring
from saeflow.autointerp.client import AnswerCache, ChatClient, ClientConfig
from saeflow.autointerp.h5data import dataset

KIND_PAD, KIND_TOP, KIND_TEST, KIND_RANDOM = 0, 1, 2, 3
EXPLAIN_PARAMS = {"max_tokens": 50, "temperature": 0.0}
SCORERS = ("detection", "fuzzing")


class Examples(NamedTuple):
    """The examples file in memory (L latents, E slots, C = ctx_len tokens)."""

    latents: np.ndarray  # int64 [L]
    tokens: np.ndarray  # int32 [L, E, C]
    acts: np.ndarray  # float32 [L, E, C]
    kind: np.ndarray  # int8 [L, E]
    decile: np.ndarray  # int8 [L, E]
    sae_id: str


def read_examples(path: str) -> Examples:
    """Load and check the examples file (format in ``saeflow.autointerp.examples``)."""
    # first the sizes (L, E, ctx_len), then every dataset's shape against them
    with h5io.open_checked(path, datasets={"latents": (None,), "kind": (None, None)}) as h5:
        for name in ("ctx_len", "sae_id"):
            if name not in h5.attrs:
                raise h5io.InputFileError(f"{path}: attribute '{name}' missing")
        (n_lat,), (_, n_slot) = dataset(h5, "latents").shape, dataset(h5, "kind").shape
        ctx = int(h5io.plain(h5.attrs["ctx_len"]))
    shapes = {"tokens": (n_lat, n_slot, ctx), "acts": (n_lat, n_slot, ctx),
              "kind": (n_lat, n_slot), "decile": (n_lat, n_slot)}
    with h5io.open_checked(path, datasets=shapes) as h5:
        arr = {name: np.array(dataset(h5, name)) for name in [*shapes, "latents"]}
        ex = Examples(arr["latents"].astype(np.int64), arr["tokens"], arr["acts"],
                      arr["kind"].astype(np.int8), arr["decile"].astype(np.int8),
                      str(h5io.plain(h5.attrs["sae_id"])))
    _check_examples(path, ex)
    return ex


def _check_examples(path: str, ex: Examples) -> None:
    if not np.isin(ex.kind, [KIND_PAD, KIND_TOP, KIND_TEST, KIND_RANDOM]).all():
        raise h5io.InputFileError(f"{path}: dataset 'kind' has values {np.unique(ex.kind)}, "
                                  "expected 0 (padding), 1 (top), 2 (decile), 3 (random)")
    test = ex.kind == KIND_TEST
    if ((ex.decile < 1) | (ex.decile > 10))[test].any() or (ex.decile[~test] != 0).any():
        raise h5io.InputFileError(f"{path}: dataset 'decile' must be 1..10 where kind == 2 "
                                  "and 0 elsewhere")
    no_top = ex.latents[~(ex.kind == KIND_TOP).any(axis=1)]
    if len(no_top):
        raise h5io.InputFileError(f"{path}: latents {no_top[:10].tolist()} have no top "
                                  "(kind 1) example to explain")


class Renderer:
    """Token ids -> text, one decoded piece per token id (cached), with optional marks."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def pieces(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i not in self._pieces:
                self._pieces[i] = self.tokenizer.decode([i])
            out.append(self._pieces[i])
        return out

    def text(self, ids: Sequence[int] | np.ndarray,
             marked: Sequence[bool] | np.ndarray | None = None) -> str:
        pieces = self.pieces(ids)
        flags = [bool(m) for m in marked] if marked is not None else [False] * len(ids)
        return prompts.mark_tokens(pieces, flags)


class TestItem(NamedTuple):
    """One scored example: its slot, decile (0 = non-activating), label and fuzzing marks [C]."""

    slot: int
    decile: int
    label: int
    marks: np.ndarray


def test_items(ex: Examples, row: int, rng: random.Random) -> list[TestItem]:
    """Decile and non-activating examples of latent ``row``, shuffled.

    Fuzzing marks: a decile example's true firing tokens; a non-activating example gets as many
    random tokens marked as the median decile example has firing ones (at least 1).
    """
    kind, acts = ex.kind[row], ex.acts[row]
    firing = [int((acts[s] > 0).sum()) for s in np.flatnonzero(kind == KIND_TEST)]
    n_fake = max(1, int(np.median(firing))) if firing else 1
    ctx = acts.shape[1]
    items = []
    for slot in np.flatnonzero((kind == KIND_TEST) | (kind == KIND_RANDOM)):
        if kind[slot] == KIND_TEST:
            items.append(TestItem(int(slot), int(ex.decile[row, slot]), 1, acts[slot] > 0))
        else:
            marks = np.zeros(ctx, bool)
            marks[rng.sample(range(ctx), min(n_fake, ctx))] = True
            items.append(TestItem(int(slot), 0, 0, marks))
    rng.shuffle(items)
    return items


def explain_examples(ex: Examples, row: int, n_explain: int, renderer: Renderer) -> list[str]:
    """The ``n_explain`` strongest top examples of latent ``row``, firing tokens marked."""
    slots = np.flatnonzero(ex.kind[row] == KIND_TOP)
    order = np.argsort(-ex.acts[row, slots].max(axis=1), kind="stable")
    return [renderer.text(ex.tokens[row, s], ex.acts[row, s] > 0) for s in slots[order][:n_explain]]


def scorer_params(n: int) -> dict[str, Any]:
    """Greedy, and room for a list of n values plus a little chatter (the original used 25)."""
    return {"max_tokens": max(25, 4 * n + 10), "temperature": 0.0}


async def run_scorer_logprob(client: Any, name: str, explanation: str, items: list[TestItem],
                             ex: Examples, row: int, renderer: Renderer) -> dict:
    """One yes/no prompt per item; predicted 1 when log P(yes) - log P(no) > 0."""
    fuzzing = name == "fuzzing"
    msgs = [prompts.yes_no_messages(
        explanation, renderer.text(ex.tokens[row, it.slot], it.marks if fuzzing else None),
        fuzzing) for it in items]
    margins = await client.yes_no_many(msgs)
    predictions = [None if m is None else int(m > 0) for m in margins]
    record = scorer_record(items, predictions, len(items), 0, sum(m is None for m in margins))
    return record | {"margin": margins}


async def run_scorer(client: Any, name: str, explanation: str, items: list[TestItem],
                     ex: Examples, row: int, per_prompt: int, renderer: Renderer,
                     method: str = "list") -> dict:
    """Ask one scorer about every item (in list batches, or one logprob prompt each)."""
    if method == "logprob":
        return await run_scorer_logprob(client, name, explanation, items, ex, row, renderer)
    build = prompts.detection_messages if name == "detection" else prompts.fuzzing_messages
    batches = [items[i:i + per_prompt] for i in range(0, len(items), per_prompt)]

    async def ask(batch: list[TestItem]) -> str | None:
        texts = [renderer.text(ex.tokens[row, it.slot], it.marks if name == "fuzzing" else None)
                 for it in batch]
        return await client.chat(build(explanation, texts), **scorer_params(len(batch)))

    answers = await asyncio.gather(*(ask(b) for b in batches))
    predictions: list[int | None] = []
    unparseable = failed = 0
    for batch, answer in zip(batches, answers):
        parsed = scoring.parse_binary_list(answer, len(batch)) if answer is not None else None
        failed += answer is None
        unparseable += answer is not None and parsed is None
        predictions += parsed if parsed is not None else [None] * len(batch)
    return scorer_record(items, predictions, len(batches), unparseable, failed)


def scorer_record(items: list[TestItem], predictions: list[int | None], n_prompts: int,
                  unparseable: int, failed: int) -> dict:
    deciles = [it.decile for it in items]
    counts = scoring.count_predictions(predictions, deciles)
    return {"example": [it.slot for it in items], "decile": deciles,
            "label": [it.label for it in items], "prediction": predictions,
            "decile_positives": counts.positives.tolist(), "decile_totals": counts.totals.tolist(),
            "nonactivating_positives": counts.neg_positives,
            "nonactivating_totals": counts.neg_totals,
            "prompts": n_prompts, "unparseable": unparseable, "failed": failed}


def empty_scorer() -> dict:
    return scorer_record([], [], 0, 0, 0)


async def score_latent(client: Any, ex: Examples, row: int, args: argparse.Namespace,
                       renderer: Renderer) -> dict:
    """Explain latent ``row``, then run both scorers on its test examples concurrently."""
    latent = int(ex.latents[row])
    top = explain_examples(ex, row, args.n_explain, renderer)
    raw = await client.chat(prompts.explainer_messages(top), **EXPLAIN_PARAMS)
    explanation = scoring.parse_explanation(raw)
    record = {"latent": latent, "explanation": explanation, "explanation_answer": raw}
    if explanation is None:
        return record | {name: empty_scorer() for name in SCORERS}
    items = test_items(ex, row, random.Random(f"{args.seed}:{latent}"))
    parts = await asyncio.gather(*(run_scorer(client, name, explanation, items, ex, row,
                                              args.examples_per_prompt, renderer, args.method)
                                   for name in SCORERS))
    return record | dict(zip(SCORERS, parts))


async def score_all(client: Any, ex: Examples, args: argparse.Namespace,
                    renderer: Renderer) -> list[dict]:
    """Every latent, concurrently (the client bounds requests in flight), in file order."""
    tasks = [asyncio.ensure_future(score_latent(client, ex, row, args, renderer))
             for row in range(len(ex.latents))]
    try:
        with tqdm(total=len(tasks), desc="latents", unit="latent", file=sys.stderr) as bar:
            for done in asyncio.as_completed(tasks):
                await done
                bar.update(1)
    finally:
        for task in tasks:
            task.cancel()
    return [task.result() for task in tasks]


def summarize(records: list[dict], client: Any, ex: Examples,
              args: argparse.Namespace) -> dict:
    """Run-level numbers and the pooled Figure 8 rows per scorer."""
    out: dict[str, Any] = {
        "sae_id": ex.sae_id, "examples": str(args.examples), "model": client.config.model,
        "latents": len(records),
        "latents_scored": sum(r["explanation"] is not None for r in records),
        **client.stats.as_dict(), "calls": client_calls(records),
        "settings": settings(args),
    }
    for name in SCORERS:
        parts = [r[name] for r in records]
        pooled = scoring.pool_counts(
            scoring.DecileCounts(np.array(p["decile_positives"]), np.array(p["decile_totals"]),
                                 p["nonactivating_positives"], p["nonactivating_totals"])
            for p in parts)
        prompts_n = sum(p["prompts"] for p in parts)
        answered = prompts_n - sum(p["failed"] for p in parts)
        unparseable = sum(p["unparseable"] for p in parts)
        labels = [y for p in parts for y in p["label"]]
        preds = [y for p in parts for y in p["prediction"]]
        bal = scoring.balanced_accuracy(labels, preds)
        out[name] = {"prompts": prompts_n, "answered": answered, "unparseable": unparseable,
                     "unparseable_rate": unparseable / answered if answered else None,
                     "balanced_accuracy": bal, "rows": scoring.figure_rows(pooled)}
    return out


def client_calls(records: list[dict]) -> int:
    """Distinct chat calls the run needed (explanations + scorer prompts)."""
    return sum(1 + sum(r[name]["prompts"] for name in SCORERS) for r in records)


def settings(args: argparse.Namespace) -> dict:
    """The knobs that shape the results (never the key, only its variable's name)."""
    keys = ("method", "server", "base_url", "model", "api_key_env", "concurrency", "timeout",
            "max_retries", "n_explain", "examples_per_prompt", "seed",
            "server_continuous_batching")
    return {k: getattr(args, k) for k in keys}


def write_results(path: str, records: list[dict]) -> None:
    with h5io.atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


async def score_with(base_url: str, model: str, ex: Examples,
                     args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Score everything against one server; return the records and the summary."""
    cfg = ClientConfig(base_url=base_url, model=model, api_key_env=args.api_key_env,
                       concurrency=args.concurrency, timeout=args.timeout,
                       max_retries=args.max_retries, backoff_base=args.backoff_base,
                       seed=args.seed)
    cache = AnswerCache(args.cache)
    renderer = Renderer(load_tokenizer(args.tokenizer))
    try:
        async with ChatClient(cfg, cache) as client:
            records = await score_all(client, ex, args, renderer)
            return records, summarize(records, client, ex, args)
    finally:
        cache.close()


async def score_in_process(ex: Examples, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Score with the model loaded here (``--server local --method logprob``)."""
    from saeflow.autointerp.judge import LocalJudge

    args.base_url, args.model = None, args.model_dir
    cache = AnswerCache(args.cache)
    try:
        judge = LocalJudge(args.model_dir, cache, threads=args.server_threads)
        records = await score_all(judge, ex, args, Renderer(load_tokenizer(args.tokenizer)))
        return records, summarize(records, judge, ex, args)
    finally:
        cache.close()


def load_tokenizer(path: str) -> Any:
    from saeflow.models import load_tokenizer as load

    return load(path)


def check_failures(summary: dict, max_fraction: float) -> None:
    """Refuse to publish results with too many unanswered calls (the cache keeps the rest)."""
    calls, failures = summary["calls"], summary["failures"]
    if calls and failures > max_fraction * calls:
        raise SystemExit(f"{failures} of {calls} LLM calls failed after retries "
                         f"(errors: {summary['errors']}), more than --max-failed-fraction "
                         f"{max_fraction}; no outputs written. Answers received are cached: "
                         "rerun to ask only the missing ones.")


def run(args: argparse.Namespace) -> dict:
    """Load, score against the local or remote server, check failures, write outputs."""
    from saeflow.autointerp.server import local_server

    ex = read_examples(args.examples)
    if args.server == "local" and args.method == "logprob":
        # transformers serve returns no logprobs (measured, 5.24): judge in this process
        records, summary = asyncio.run(score_in_process(ex, args))
    elif args.server == "local":
        log = args.server_log or f"{args.summary}.server.log"
        with local_server(args.model_dir, log, threads=args.server_threads,
                          continuous_batching=args.server_continuous_batching) as srv:
            args.base_url, args.model = srv.base_url, srv.model
            records, summary = asyncio.run(score_with(srv.base_url, srv.model, ex, args))
    else:
        records, summary = asyncio.run(score_with(args.base_url, args.model, ex, args))
    check_failures(summary, args.max_failed_fraction)
    write_results(args.out, records)
    h5io.write_json(args.summary, summary)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saeflow.autointerp.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", required=True, help="latent examples file (.h5)")
    p.add_argument("--tokenizer", required=True, help="local model folder to decode tokens")
    p.add_argument("--out", required=True, help="per-latent results (.jsonl)")
    p.add_argument("--summary", required=True, help="run summary (.json)")
    p.add_argument("--cache", required=True, help="answer cache (.jsonl), kept across runs")
    p.add_argument("--server", choices=["local", "remote"], default="remote",
                   help="local: start transformers serve on --model-dir; remote: use --base-url")
    p.add_argument("--model-dir", help="model folder for --server local")
    p.add_argument("--method", choices=["list", "logprob"], default="list",
                   help="list: batches answered as [1, 0, ...]; logprob: one yes/no prompt per "
                        "example, P(yes) vs P(no) (local: in this process; remote: needs a "
                        "server that returns logprobs)")
    p.add_argument("--server-log", help="log of the local server (default: SUMMARY.server.log)")
    p.add_argument("--server-threads", type=int, default=None, help="CPU threads of the server")
    p.add_argument("--server-continuous-batching", action="store_true",
                   help="local server batches concurrent requests (else it answers one at a time)")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--model", help="model name the remote server expects")
    p.add_argument("--api-key-env", help="NAME of the environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request attempt")
    p.add_argument("--max-retries", type=int, default=4, help="retries per request")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first retry delay (s)")
    p.add_argument("--n-explain", type=int, default=10, help="top examples shown to explainer")
    p.add_argument("--examples-per-prompt", type=int, default=5, help="scorer batch size")
    p.add_argument("--seed", type=int, default=0, help="seeds shuffles, fake marks and jitter")
    p.add_argument("--max-failed-fraction", type=float, default=0.1,
                   help="fail the stage if more than this fraction of LLM calls failed")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.server == "local" and not args.model_dir:
        p.error("--server local needs --model-dir")
    if args.server == "remote" and not (args.base_url and args.model):
        p.error("--server remote (the default) needs --base-url and --model")
    if args.server == "local" and (args.base_url or args.model or args.api_key_env):
        p.error("--base-url/--model/--api-key-env are for a remote server, not --server local")
    for name in ("concurrency", "n_explain", "examples_per_prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.timeout <= 0 or args.max_retries < 0 or not 0 <= args.max_failed_fraction <= 1:
        p.error("--timeout must be > 0, --max-retries >= 0, --max-failed-fraction in [0, 1]")


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
