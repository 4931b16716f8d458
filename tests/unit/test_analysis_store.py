"""Both feature-database back-ends, real: round trip, idempotent reload, a killed load."""

import gzip
import json
import os
import signal
import subprocess
import sys

import pytest
from pg_server import scratch_server, store_url

from saeflow.analysis import store


def _doc(i: int, version: int, pad: int = 0) -> dict:
    return {"index": i, "count": i * version, "freq": i / 100.0, "max": float(version),
            "hist": {"max": 1.0, "counts": [i, version]}, "logits": {"pos": [[" the", 1.5]],
                                                                     "neg": [["é", -2.0]]},
            "neighbours": [[(i + 1) % 50, 0.5]],
            "samples": [{"kind": "top", "tokens": ["a", " b"] * (1 + pad), "acts": [0, 1.0]}]}


def _summary(version: int) -> dict:
    return {"sae_id": "s1", "d_sae": 50, "n_tokens": 100, "run": version}


@pytest.fixture(scope="module")
def pg_url():
    with scratch_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    return store_url(request, tmp_path, ("features", "saes", "interpretations", "bookmarks"))


def test_round_trip_and_reload_replaces(db):
    s = store.open_store(db)
    docs = [_doc(i, 1) for i in range(50)]
    assert s.load(_summary(1), docs, {"fvu": 0.2}, [(3, "commas", {"detection": 0.75})], 7) == 50
    s.put_interpretation("s1", 4, "user words", {"manual": 1.0})
    s.add_bookmark("s1", 4, "look")
    assert s.saes()[0]["summary"]["run"] == 1 and s.saes()[0]["metrics"] == {"fvu": 0.2}
    assert s.feature_count("s1") == 50
    got = s.feature("s1", 3)
    assert got is not None
    assert {k: got[k] for k in docs[3]} == docs[3]  # unicode and floats survive
    assert got["interpretations"][0]["text"] == "commas"
    assert got["interpretations"][0]["score"] == {"detection": 0.75}
    assert s.feature_indices("s1", 0.1, 0.2) == list(range(10, 21))
    assert s.feature("s1", 50) is None
    # reload with fewer latents: the old rows and auto-interp go, user data stays
    assert s.load(_summary(2), [_doc(i, 2) for i in range(20)], None, []) == 20
    assert s.feature_count("s1") == 20 and len(s.saes()) == 1
    assert s.saes()[0]["summary"]["run"] == 2
    assert s.feature("s1", 3)["interpretations"] == []  # type: ignore[index]
    four = s.feature("s1", 4)
    assert four is not None and four["bookmarked"] and four["count"] == 8
    assert four["interpretations"][0]["source"] == "user"
    assert s.bookmarks()[0]["index"] == 4
    assert s.delete_bookmark("s1", 4) and not s.delete_bookmark("s1", 4)
    s.close()


def test_killed_load_leaves_previous_version(db, tmp_path):
    s = store.open_store(db)
    s.load(_summary(1), [_doc(i, 1) for i in range(50)], None)
    s.close()
    features = tmp_path / "f.jsonl.gz"
    with gzip.open(features, "wt") as f:
        for i in range(3000):
            f.write(json.dumps(_doc(i, 2, pad=50)) + "\n")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(_summary(2)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeflow.analysis.store", "load", "--db", db, "--sae-id", "s1",
         "--features", str(features), "--summary", str(summary), "--batch-rows", "20"],
        stderr=subprocess.PIPE, text=True, env={**os.environ})
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("loaded 20 features"):  # rows written, transaction still open
            os.kill(proc.pid, signal.SIGKILL)
            break
    assert proc.wait() == -signal.SIGKILL
    s = store.open_store(db)
    assert s.feature_count("s1") == 50
    assert s.saes()[0]["summary"]["run"] == 1
    assert s.feature("s1", 3)["max"] == 1.0  # type: ignore[index]
    # and a complete load after the crash goes through
    assert s.load(_summary(3), [_doc(i, 3) for i in range(5)], None) == 5
    assert s.feature_count("s1") == 5
    s.close()


def test_autointerp_scores(tmp_path):
    rec = {"latent": 7, "explanation": "dates",
           "detection": {"label": [1, 1, 0, 0], "prediction": [1, 0, 0, None]},
           "fuzzing": {"label": [1, 0], "prediction": [None, None]}}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"latent": 8, "explanation": None}) + "\n")
    assert store.read_autointerp(str(path)) == [(7, "dates", {"detection": 0.75,
                                                              "fuzzing": None})]


def test_bad_db_url_is_named():
    with pytest.raises(ValueError, match="mysql://x"):
        store.open_store("mysql://x")
