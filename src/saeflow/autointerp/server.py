"""A local OpenAI-compatible LLM server (``transformers serve``) that is always stopped.

``with local_server(model_dir, log_path) as server:`` starts
``transformers serve <model_dir> --device cpu --host 127.0.0.1 --port <free port>`` offline in its
own process group, waits until ``POST /v1/chat/completions`` answers (``GET /v1/models`` can fail
with HTTP 500 when there is no hub cache directory, so it is not used), and yields the base URL and
the model name requests must carry. On leaving the block, by return, exception, or SIGTERM of this
process (Snakemake terminates failed jobs), the group gets SIGTERM, then SIGKILL. On Linux the
server also gets SIGTERM if this process dies abruptly (``PR_SET_PDEATHSIG``).

Facts about ``transformers serve`` (5.23): the folder given as the positional FORCE_MODEL is
preloaded and the server is pinned to it: requests must name exactly that string as ``model`` (or
none); any other name is answered with HTTP 400. SmolLM2-135M-Instruct's chat template works. A
start takes about 40 s on 2 CPU cores, the first answer a few seconds more.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message carries the log's tail."""


@dataclass(frozen=True)
class LocalServer:
    """A running server: where to send requests and what to call the model."""

    base_url: str  # e.g. http://127.0.0.1:40123/v1
    model: str  # the name requests must carry
    pid: int
    port: int


def free_port() -> int:
    """A loopback port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def serve_command(model_dir: str, port: int, continuous_batching: bool = False) -> list[str]:
    """The server's argv; the current interpreter, so it runs in this environment.

    Without continuous batching, ``transformers serve`` runs one ``generate`` at a time, so
    concurrent requests only queue; with it, 8 concurrent short requests finished 1.8x sooner
    than one at a time on 2 CPU cores (measured 2026-11-22), at the same greedy answers.
    """
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir,
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            *(["--continuous-batching"] if continuous_batching else [])]


def _libc_prctl() -> object | None:
    """libc's prctl, resolved before any fork (Linux only)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the server when the process that started it dies.

    Only one pre-resolved libc call after fork: no imports, no locks, so it is safe even though
    the caller may have threads (the reason ruff warns about preexec_fn).
    """
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[operator]


def _server_env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def wait_ready(proc: subprocess.Popen, base_url: str, model: str, log_path: Path,
               timeout: float) -> None:
    """Poll a 1-token chat completion until it answers 200; raise if the server dies or hangs."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerStartError(f"transformers serve exited with code {proc.returncode} "
                                       f"before answering; log {log_path}:\n{_log_tail(log_path)}")
            try:
                if http.post(f"{base_url}/chat/completions", json=body).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
    raise ServerStartError(f"transformers serve did not answer within {timeout:.0f} s; "
                           f"log {log_path}:\n{_log_tail(log_path)}")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds; reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group, if any
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) while the block runs, so ``finally`` clauses run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def local_server(model_dir: str | os.PathLike[str], log_path: str | os.PathLike[str], *,
                 port: int | None = None, startup_timeout: float = 300.0,
                 threads: int | None = None, continuous_batching: bool = False,
                 command: Callable[[str, int], list[str]] | None = None,
                 ) -> Iterator[LocalServer]:
    """Run ``transformers serve`` on ``model_dir`` (a local HF folder) for the block's duration.

    ``command(model_dir, port)`` gives another server's argv (an OpenAI-compatible stand-in, in
    tests); by default it is :func:`serve_command`.
    """
    def default_command(model_dir: str, port: int) -> list[str]:
        return serve_command(model_dir, port, continuous_batching)

    argv = command or default_command

    model_dir = str(model_dir)
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model-dir {model_dir}: no config.json; not a model folder")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    with _sigterm_raises(), open(log_path, "ab") as log:
        proc = subprocess.Popen(argv(model_dir, port), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=_server_env(threads),
                                start_new_session=True,
                                preexec_fn=_die_with_parent if _PRCTL else None)  # noqa: PLW1509
        try:
            wait_ready(proc, base_url, model_dir, log_path, startup_timeout)
            yield LocalServer(base_url=base_url, model=model_dir, pid=proc.pid, port=port)
        finally:
            stop(proc)
