"""Yes/no log-probability judging: the margin from a server's top logprobs, the logprob method
of the scoring stage against a real HTTP server, and the packaged SmolLM2 judged in process on
a small ground-truth set of real news windows (explanations decided by string matching)."""

import asyncio
import math

import pytest
from chat_server import ChatServer, oracle_answer

from saeflow.autointerp import prompts
from saeflow.autointerp.client import AnswerCache, ChatClient, ClientConfig
from saeflow.autointerp.judge import (
    FLOOR,
    LocalJudge,
    answer_word,
    logsumexp,
    margin_from_top,
    top_logprobs,
)


def test_margin_sums_spellings_and_floors_a_missing_word():
    top = [("Yes", math.log(0.5)), (" yes", math.log(0.2)), (" No", math.log(0.1)),
           ("The", math.log(0.05))]
    assert margin_from_top(top) == pytest.approx(math.log(0.7) - math.log(0.1), abs=1e-12)
    # "no" absent from the top-k: it gets the floor, below every listed logprob
    assert margin_from_top({"yes": -0.1, "maybe": -3.0}) == pytest.approx(-0.1 - FLOOR)
    assert margin_from_top({"no": -0.1, "x": -40.0}) == pytest.approx(-40.0 + 0.1)
    with pytest.raises(ValueError, match="no top logprobs"):
        margin_from_top([])
    assert [answer_word(t) for t in (" YES", "no\n", "nope", "Yes.")] == ["yes", "no", None, None]
    assert logsumexp([]) == -math.inf


def test_top_logprobs_reads_the_openai_layout_and_names_a_server_without_it():
    body = {"choices": [{"message": {"content": "no"}, "logprobs": {"content": [
        {"token": "no", "logprob": -0.3, "top_logprobs": [{"token": "yes", "logprob": -1.5}]}]}}]}
    assert top_logprobs(body) == [("yes", -1.5), ("no", -0.3)]
    with pytest.raises(ValueError, match="transformers serve does not"):
        top_logprobs({"choices": [{"message": {"content": "No"}}]})


def test_remote_yes_no_is_cached_and_a_server_without_logprobs_is_not_retried(tmp_path):
    msgs = prompts.yes_no_messages('the word "police"', "The police came.")

    async def ask(server, cache):
        cfg = ClientConfig(base_url=server.base_url, model="judge", max_retries=3,
                           backoff_base=0.01)
        async with ChatClient(cfg, cache) as client:
            return await client.yes_no(msgs), client.stats

    cache = AnswerCache(tmp_path / "c.jsonl")
    with ChatServer(answer=oracle_answer) as server:
        margin, stats = asyncio.run(ask(server, cache))
        assert server.requests == 1 and server.bodies[0]["top_logprobs"] == 20
        assert server.bodies[0]["max_tokens"] == 1 and server.bodies[0]["logprobs"] is True
    assert margin == pytest.approx(-0.2 + 1.8)
    with ChatServer(answer=oracle_answer) as server:
        again, stats = asyncio.run(ask(server, cache))
        assert server.requests == 0 and again == margin and stats.cache_hits == 1
    cache.close()
    # a server that answers without logprobs (as transformers serve does): one try, a failure
    with ChatServer(answer=oracle_answer, logprobs=False) as server:
        cache2 = AnswerCache(tmp_path / "c2.jsonl")
        margin, stats = asyncio.run(ask(server, cache2))
        cache2.close()
        assert margin is None and server.requests == 1 and stats.errors == {"no_logprobs": 1}


@pytest.fixture(scope="module")
def smollm2_judge(packaged_model_dir, tmp_path_factory):
    cache = AnswerCache(tmp_path_factory.mktemp("judge") / "cache.jsonl")
    yield LocalJudge(str(packaged_model_dir), cache, threads=2)
    cache.close()


def test_in_process_margins_match_a_float64_recomputation(smollm2_judge):
    import torch

    judge = smollm2_judge
    texts = [judge.render(prompts.yes_no_messages("a month name", t))
             for t in ("It happened in March.", "A dog ran.", "Police said on Monday that")]
    batched = judge.margins_now(texts)  # left-padded batch
    for text, got in zip(texts, batched):
        ids = judge.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            logp = torch.log_softmax(judge.model(**ids).logits[0, -1].double(), -1)
        want = (torch.logsumexp(logp[judge._ids["yes"]], 0)
                - torch.logsumexp(logp[judge._ids["no"]], 0)).item()
        assert got == pytest.approx(want, abs=1e-4)
    assert {judge.tokenizer.decode([i]).strip() for i in judge._ids["yes"]} <= {"yes", "Yes", "YES"}


def test_ground_truth_items_are_balanced_and_labelled_by_their_pattern():
    from saeflow.autointerp import groundtruth

    texts = ["In March police said Monday that 3 men were held in France",
             "The dog ran across the garden and the cat watched it go"] * 4  # 12 words each
    four = groundtruth.FEATURES[:4]
    items = groundtruth.build_items(texts, n_per_class=2, seed=0, n_words=6, features=four)
    feats = {f.name: f for f in groundtruth.FEATURES}
    for name in ("month", "weekday", "country", "digits"):
        mine = [it for it in items if it.feature == name]
        assert sorted(it.label for it in mine) == [0, 0, 1, 1]
        assert all(bool(feats[name].pattern.search(it.text)) == bool(it.label) for it in mine)
    assert not feats["month"].pattern.search("Theresa May said")  # "May" is left out on purpose
    with pytest.raises(ValueError, match="feature 'money': 0 positive"):
        groundtruth.build_items(texts, n_per_class=1, n_words=6)
