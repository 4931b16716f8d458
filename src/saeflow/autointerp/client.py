"""An async client for OpenAI-compatible chat completions, with retries and an on-disk cache.

The same client talks to the local ``transformers serve`` (see :mod:`saeflow.autointerp.server`),
vLLM, SGLang, OpenAI or OpenRouter: only the base URL, the model name and the NAME of the
environment variable holding the API key change. The key is read from the environment, sent
only in the ``Authorization`` header, and never written to the cache, logs or outputs.

Why a cache: LLM answers are the slow and paid part of auto-interpretation. Every answer is
appended to a JSONL file (one line per answer, flushed and fsynced), keyed by a hash of
(model, messages, sampling parameters), so an interrupted or repeated run never asks twice.
A torn last line (the process was killed mid-write) is dropped when the cache is opened.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ClientConfigError(ValueError):
    """The client is misconfigured (e.g. the API key's environment variable is not set)."""


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to ask. Never holds the key itself, only its variable's name."""

    base_url: str
    """e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)."""
    model: str
    """The model name the server expects (for transformers serve: the folder it was given)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; None sends no key."""
    concurrency: int = 4
    """Requests in flight at once."""
    timeout: float = 60.0
    """Seconds per request attempt, connection to last byte."""
    max_retries: int = 4
    """Extra attempts after the first on connection errors, time-outs, 429/5xx, bad bodies."""
    backoff_base: float = 1.0
    """Delay before retry r is backoff_base·2^r seconds, times a jitter in [0.5, 1.5)."""
    backoff_max: float = 30.0
    """Cap on one delay (also on a server's Retry-After)."""
    seed: int = 0
    """Seeds the jitter, so retry timing is reproducible."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise ClientConfigError(
                f"concurrency must be >= 1 (got {self.concurrency}), timeout > 0 (got "
                f"{self.timeout}), max_retries >= 0 (got {self.max_retries})")


@dataclass
class ClientStats:
    """What the client did: the numbers a run's summary reports."""

    requests: int = 0  # HTTP attempts sent (retries included)
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0  # calls that ended without an answer
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count, all attempts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RequestFailed(RuntimeError):
    """An attempt failed; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, kind: str, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.retryable, self.retry_after = kind, retryable, retry_after


def cache_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the answer."""
    blob = json.dumps({"model": model, "messages": messages, "params": params},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
    """Append-only JSONL of answers: ``{"key": ..., "model": ..., "answer": ...}`` per line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self) -> None:
        """Read every complete line; cut a torn tail so the next append starts a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
                self.answers[record["key"]] = record["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # a damaged line costs one repeated request, never a wrong answer

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, model: str, answer: str) -> None:
        """Append one line in one write, then fsync: a crash loses at most this answer."""
        line = json.dumps({"key": key, "model": model, "answer": answer}, ensure_ascii=False)
        os.write(self._fd, (line + "\n").encode())
        os.fsync(self._fd)
        self.answers[key] = answer

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __len__(self) -> int:
        return len(self.answers)


def answer_text(body: Any) -> str:
    """The assistant message of a chat-completions JSON body; a malformed body raises."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise RequestFailed("bad_body", f"no choices[0].message.content ({err!r})", True) from err
    if not isinstance(content, str):
        raise RequestFailed("bad_body", f"content is {type(content).__name__}", True)
    return content


def _margin_text(body: Any) -> str:
    """The yes/no margin of a body with logprobs, as text (a missing field: a bad body)."""
    from saeflow.autointerp.judge import margin_from_top, top_logprobs

    try:
        return repr(margin_from_top(top_logprobs(body)))
    except ValueError as err:  # not retried: a server without logprobs will not grow them
        raise RequestFailed("no_logprobs", str(err), False) from err


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


class ChatClient:
    """Bounded-concurrency chat completions with retries, counting, and the answer cache.

    Use as ``async with ChatClient(cfg, cache) as client: text = await client.chat(messages)``.
    """

    def __init__(self, config: ClientConfig, cache: AnswerCache) -> None:
        self.config, self.cache = config, cache
        self.stats = ClientStats()
        self._key = self._read_key(config.api_key_env)
        self._rng = random.Random(config.seed)
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._inflight: dict[str, asyncio.Future[str | None]] = {}
        self._http: httpx.AsyncClient | None = None

    @staticmethod
    def _read_key(env: str | None) -> str | None:
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise ClientConfigError(f"environment variable {env!r} (the API key) is not set")
        return key

    async def __aenter__(self) -> Self:
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.config.concurrency)
        self._http = httpx.AsyncClient(base_url=self.config.base_url.rstrip("/"),
                                       headers=headers, limits=limits,
                                       timeout=self.config.timeout, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()

    def redact(self, text: str) -> str:
        """Error text with the key (should a server echo it) replaced."""
        return text.replace(self._key, "***") if self._key else text

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> str | None:
        """The answer to ``messages`` (cached, or asked), or None if every attempt failed.

        ``params`` are sampling parameters (max_tokens, temperature, seed, ...) sent as given.
        Identical calls in flight at once share one request.
        """
        return await self._cached_call(messages, params, answer_text)

    async def yes_no(self, messages: list[dict[str, str]]) -> float | None:
        """log P(yes) - log P(no) of the first answer token, from the server's ``top_logprobs``.

        Needs a server that returns logprobs (vLLM, OpenAI); a body without them is a failed
        attempt (``bad_body``). Cached as the margin's decimal text.
        """
        params = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": 20}
        text = await self._cached_call(messages, params, _margin_text)
        return float(text) if text is not None else None

    async def yes_no_many(self, batch: list[list[dict[str, str]]]) -> list[float | None]:
        return list(await asyncio.gather(*(self.yes_no(m) for m in batch)))

    async def _cached_call(self, messages: list[dict[str, str]], params: dict[str, Any],
                           extract: Callable[[Any], str]) -> str | None:
        key = cache_key(self.config.model, messages, params)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        if key in self._inflight:
            self.stats.cache_hits += 1
            return await asyncio.shield(self._inflight[key])
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await self._ask(messages, params, extract)
            if answer is not None:
                self.cache.put(key, self.config.model, answer)
            future.set_result(answer)
            return answer
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # mark retrieved: waiters re-raise, nobody logs it twice
            raise
        finally:
            del self._inflight[key]

    async def _ask(self, messages: list[dict[str, str]], params: dict[str, Any],
                   extract: Callable[[Any], str] = answer_text) -> str | None:
        """Attempts with exponential backoff; None (and a counted failure) when they run out."""
        body = {"model": self.config.model, "messages": messages, **params}
        for attempt in range(self.config.max_retries + 1):
            try:
                async with self._semaphore:
                    return await self._attempt(body, extract)
            except RequestFailed as err:
                self.stats.errors[err.kind] = self.stats.errors.get(err.kind, 0) + 1
                if not err.retryable or attempt == self.config.max_retries:
                    break
                self.stats.retries += 1
                await asyncio.sleep(self._delay(attempt, err.retry_after))
        self.stats.failures += 1
        return None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max, cfg.backoff_base * 2**attempt) * (0.5 + self._rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max))
        return delay

    async def _attempt(self, body: dict[str, Any],
                       extract: Callable[[Any], str] = answer_text) -> str:
        """One POST; classifies every way it can go wrong as a RequestFailed."""
        assert self._http is not None, "use ChatClient as an async context manager"
        self.stats.requests += 1
        try:
            response = await asyncio.wait_for(
                self._http.post("/chat/completions", json=body), self.config.timeout)
        except (TimeoutError, httpx.TimeoutException) as err:
            raise RequestFailed("timeout", f"no answer in {self.config.timeout} s", True) from err
        except httpx.TransportError as err:
            raise RequestFailed("connection", self.redact(repr(err)), True) from err
        if response.status_code != 200:
            retryable = response.status_code in RETRY_STATUS
            raise RequestFailed(f"http_{response.status_code}",
                                self.redact(response.text[:200]), retryable, _retry_after(response))
        try:
            return extract(response.json())
        except ValueError as err:
            raise RequestFailed("bad_body", "body is not JSON", True) from err
