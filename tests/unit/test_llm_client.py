"""The chat client against a real local HTTP server with scripted faults; the answer cache; and
the local-server lifecycle (start, ready, always stopped) with a small real server process."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from chat_server import ChatServer

from saeflow.autointerp.client import (
    AnswerCache,
    ChatClient,
    ClientConfig,
    ClientConfigError,
    cache_key,
)
from saeflow.autointerp.server import ServerStartError, local_server, port_open, serve_command

HERE = Path(__file__).resolve().parent
SECRET = "sk-test-7f3a9c1e-do-not-leak"


def config(server: ChatServer, **kw) -> ClientConfig:
    kw = {"timeout": 5.0, "max_retries": 4, "backoff_base": 0.01, "backoff_max": 0.05} | kw
    return ClientConfig(base_url=server.base_url, model="m", **kw)


def ask_all(cfg: ClientConfig, cache_path: Path, prompts: list[str], **params):
    """Ask every prompt concurrently with a fresh client and cache; return answers, stats."""
    async def go():
        cache = AnswerCache(cache_path)
        try:
            async with ChatClient(cfg, cache) as client:
                answers = await asyncio.gather(
                    *(client.chat([{"role": "user", "content": p}], **params) for p in prompts))
                return answers, client.stats
        finally:
            cache.close()
    return asyncio.run(go())


def test_answers_cached_and_never_asked_twice(tmp_path):
    cache = tmp_path / "cache.jsonl"
    prompts = [f"q{i}" for i in range(6)]
    with ChatServer() as server:
        answers, stats = ask_all(config(server), cache, prompts, max_tokens=5)
        assert answers == [f"answer to: q{i}" for i in range(6)]
        assert server.requests == 6 and stats.requests == 6 and stats.cache_hits == 0
        assert server.bodies[0]["max_tokens"] == 5 and server.bodies[0]["model"] == "m"
        again, stats = ask_all(config(server), cache, prompts + ["new"], max_tokens=5)
        assert again[:6] == answers and server.requests == 7  # only the new prompt
        assert stats.cache_hits == 6 and stats.requests == 1
        # other sampling parameters are another question
        ask_all(config(server), cache, ["q0"], max_tokens=6)
        assert server.requests == 8
    assert len(cache.read_text().splitlines()) == 8


def test_identical_calls_in_flight_share_one_request(tmp_path):
    with ChatServer(delay=0.2) as server:
        answers, stats = ask_all(config(server), tmp_path / "c.jsonl", ["same"] * 5)
    assert answers == ["answer to: same"] * 5 and server.requests == 1 and stats.cache_hits == 4


def test_faults_are_retried_and_counted(tmp_path):
    script = ["drop", "500", "garbage", "429", "no_choices", "503"]
    with ChatServer(script=script) as server:
        answers, stats = ask_all(config(server, concurrency=1, max_retries=6),
                                 tmp_path / "c.jsonl", ["q"])
    assert answers == ["answer to: q"]
    assert server.requests == 7 and stats.requests == 7 and stats.retries == 6
    assert stats.failures == 0
    assert stats.errors == {"connection": 1, "http_500": 1, "bad_body": 2, "http_429": 1,
                            "http_503": 1}


def test_timeout_is_retried(tmp_path):
    with ChatServer(script=["sleep"], sleep=2.0) as server:
        t0 = time.monotonic()
        answers, stats = ask_all(config(server, timeout=0.3), tmp_path / "c.jsonl", ["q"])
        assert time.monotonic() - t0 < 1.9  # the client did not wait for the slow answer
    assert answers == ["answer to: q"] and stats.errors == {"timeout": 1}
    assert server.requests == 2 and stats.retries == 1


def test_exhausted_retries_are_failures_and_not_cached(tmp_path):
    cache = tmp_path / "c.jsonl"
    with ChatServer(default="500") as server:
        answers, stats = ask_all(config(server, max_retries=2), cache, ["a", "b"])
        assert answers == [None, None] and stats.failures == 2 and stats.retries == 4
        assert server.requests == 6
    assert cache.read_text() == ""
    with ChatServer(script=["400"]) as server:  # a client error is not retried
        answers, stats = ask_all(config(server), cache, ["a"])
        assert answers == [None] and server.requests == 1 and stats.errors == {"http_400": 1}
    with ChatServer() as server:  # failures are asked again on the next run
        answers, _ = ask_all(config(server), cache, ["a", "b"])
        assert answers == ["answer to: a", "answer to: b"] and server.requests == 2


def test_concurrency_is_bounded(tmp_path):
    with ChatServer(delay=0.15) as server:
        ask_all(config(server, concurrency=3), tmp_path / "c.jsonl", [str(i) for i in range(12)])
    assert server.max_in_flight == 3


def test_backoff_jitter_is_seeded():
    cfg = ClientConfig(base_url="http://127.0.0.1:9/v1", model="m", seed=7, backoff_base=1.0)
    clients = [ChatClient(cfg, None) for _ in range(2)]  # type: ignore[arg-type] (no cache needed)
    delays = [[client._delay(a, None) for a in range(4)] for client in clients]
    assert delays[0] == delays[1]
    assert all(0.5 * 2**a <= d < 1.5 * 2**a for a, d in enumerate(delays[0]))
    assert ChatClient(cfg, None)._delay(0, retry_after=20.0) == 20.0  # type: ignore[arg-type]


def test_torn_last_line_is_ignored_and_cut(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = AnswerCache(path)
    cache.put("k1", "m", "one")
    cache.put("k2", "m", "two")
    cache.close()
    with open(path, "ab") as fh:
        fh.write(b'{"key": "k3", "model": "m", "ans')  # killed mid-write
    cache = AnswerCache(path)
    assert cache.answers == {"k1": "one", "k2": "two"}
    cache.put("k3", "m", "three")
    cache.close()
    assert AnswerCache(path).answers == {"k1": "one", "k2": "two", "k3": "three"}


def test_cache_key_covers_model_messages_and_params():
    msgs = [{"role": "user", "content": "x"}]
    base = cache_key("m", msgs, {"temperature": 0.0, "max_tokens": 5})
    assert base == cache_key("m", msgs, {"max_tokens": 5, "temperature": 0.0})  # order-free
    assert base != cache_key("m2", msgs, {"temperature": 0.0, "max_tokens": 5})
    assert base != cache_key("m", [{"role": "user", "content": "y"}],
                             {"temperature": 0.0, "max_tokens": 5})
    assert base != cache_key("m", msgs, {"temperature": 0.0, "max_tokens": 6})


def test_api_key_sent_only_in_header(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_TEST_LLM_KEY", SECRET)
    cache = tmp_path / "c.jsonl"
    with ChatServer(script=["500"]) as server:
        answers, stats = ask_all(config(server, api_key_env="SAEFLOW_TEST_LLM_KEY"), cache, ["q"])
        assert server.auth == [f"Bearer {SECRET}"] * 2
        assert SECRET not in repr(server.bodies)
    assert answers == ["answer to: q"]
    assert SECRET not in cache.read_text() and SECRET not in repr(stats.as_dict())
    monkeypatch.delenv("SAEFLOW_TEST_LLM_KEY")
    with pytest.raises(ClientConfigError, match="'SAEFLOW_TEST_LLM_KEY'"):
        ChatClient(ClientConfig(base_url="http://x/v1", model="m",
                                api_key_env="SAEFLOW_TEST_LLM_KEY"), None)  # type: ignore[arg-type]


# ---- local server lifecycle, with a small real server process instead of transformers serve ---

def fake_serve(model_dir: str, port: int) -> list[str]:
    return [sys.executable, str(HERE / "chat_server.py"), "--port", str(port),
            "--startup-delay", "0.5"]


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_local_server_stops_on_exit_and_on_exception(tmp_path):
    folder = model_folder(tmp_path)
    with local_server(folder, tmp_path / "s.log", command=fake_serve) as srv:
        assert port_open(srv.port) and srv.model == str(folder)
        answers, _ = ask_all(ClientConfig(base_url=srv.base_url, model=srv.model),
                             tmp_path / "c.jsonl", ["hello"])
        assert answers == ["answer to: hello"]
    assert not port_open(srv.port) and gone(srv.pid)
    with (pytest.raises(RuntimeError, match="boom"),
          local_server(folder, tmp_path / "s.log", command=fake_serve) as srv):
        raise RuntimeError("boom")
    assert not port_open(srv.port) and gone(srv.pid)
    assert "listening on" in (tmp_path / "s.log").read_text()


def test_local_server_start_failures_are_clear(tmp_path):
    with (pytest.raises(FileNotFoundError, match="no config.json"),
          local_server(tmp_path, tmp_path / "s.log")):
        pass

    def crash(model_dir, port):
        return [sys.executable, "-c", "import sys; print('cannot load model'); sys.exit(3)"]

    with (pytest.raises(ServerStartError, match="code 3(.|\n)*cannot load model"),
          local_server(model_folder(tmp_path), tmp_path / "s.log", command=crash)):
        pass


def test_local_server_stopped_when_parent_gets_sigterm(tmp_path):
    """Snakemake terminates a failed job with SIGTERM: the server must not outlive it."""
    folder = model_folder(tmp_path)
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from test_llm_client import fake_serve
        from saeflow.autointerp.server import local_server
        with local_server({str(folder)!r}, {str(tmp_path / 's.log')!r}, command=fake_serve) as s:
            print(s.pid, s.port, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid, port = map(int, parent.stdout.readline().split())
    assert port_open(port)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert not port_open(port) and gone(pid)


def test_serve_command_runs_this_interpreter_offline_on_loopback():
    argv = serve_command("/models/smol", 4242)
    assert argv[:5] == [sys.executable, "-m", "transformers.cli.transformers", "serve",
                        "/models/smol"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "4242"
    assert argv[argv.index("--device") + 1] == "cpu" and "--continuous-batching" not in argv
    assert serve_command("/m", 1, continuous_batching=True)[-1] == "--continuous-batching"
