"""Yes/no judging by log-probability, and an in-process judge on a local model folder.

The list prompts (``prompts.detection_messages``) ask a judge to write ``[1, 0, 1]``; SmolLM2-135M
copies the worked example whatever it is shown (README, Figure 8). Here each window gets its own
short prompt ending in "Answer yes or no." and the judge's answer is the margin

    margin = log P(yes) - log P(no)

of the first answer token, summed over the spellings of each word (``yes``, ``Yes``, `` yes``...).
No text is generated, so nothing can be copied. The same idea is used by the classifier-style
scorers of auto-interp tools that read token probabilities instead of parsing a list.

Two sources of the margin:

- :class:`LocalJudge`: a causal LM loaded in this process with transformers (the local
  ``transformers serve`` 5.24 ignores ``logprobs``: measured, its answers carry no ``logprobs``
  field), full next-token distribution.
- ``ChatClient.yes_no`` (:mod:`saeflow.autointerp.client`): ``logprobs``/``top_logprobs`` of an
  OpenAI-compatible server (vLLM, OpenAI), from the top-k tokens only.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from saeflow.autointerp.client import AnswerCache, ClientStats, cache_key

Messages = list[dict[str, str]]
YES, NO = "yes", "no"
# a word missing from a server's top-k gets this log-probability (below any top-20 entry a
# sensible model returns); clipping keeps the margin finite and the sign meaningful
FLOOR = -30.0


def answer_word(token: str) -> str | None:
    """``"yes"``/``"no"`` if the token text is a spelling of one (case, spaces), else None."""
    word = token.strip().lower()
    return word if word in (YES, NO) else None


def logsumexp(values: Iterable[float]) -> float:
    vals = [v for v in values if v > -math.inf]
    if not vals:
        return -math.inf
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


def margin_from_top(top: Mapping[str, float] | Sequence[tuple[str, float]]) -> float:
    """log P(yes) - log P(no) from a server's top-k ``(token, logprob)`` pairs.

    A word absent from the top-k is given ``min(FLOOR, lowest listed logprob)``: its true
    probability is below every listed one, so the sign of the margin stays right.
    """
    pairs = list(top.items()) if isinstance(top, Mapping) else list(top)
    if not pairs:
        raise ValueError("no top logprobs to read a yes/no margin from")
    floor = min(FLOOR, min(lp for _, lp in pairs))
    by_word: dict[str, list[float]] = {YES: [], NO: []}
    for token, logprob in pairs:
        word = answer_word(token)
        if word is not None:
            by_word[word].append(logprob)
    yes = logsumexp(by_word[YES]) if by_word[YES] else floor
    no = logsumexp(by_word[NO]) if by_word[NO] else floor
    return yes - no


def top_logprobs(body: Any) -> list[tuple[str, float]]:
    """The first generated token's ``top_logprobs`` of a chat-completions body (OpenAI format)."""
    try:
        first = body["choices"][0]["logprobs"]["content"][0]
        pairs = [(str(t["token"]), float(t["logprob"])) for t in first["top_logprobs"]]
        if str(first["token"]) not in {t for t, _ in pairs}:  # the chosen token, if not listed
            pairs.append((str(first["token"]), float(first["logprob"])))
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"no choices[0].logprobs.content[0].top_logprobs ({err!r}); the "
                         "server must support logprobs (vLLM and OpenAI do; transformers "
                         "serve does not)") from err
    return pairs


@dataclass
class _Config:
    model: str


@dataclass
class LocalJudge:
    """A causal LM from a local folder (or a GGUF file in one), judged in this process.

    Offers the two calls the scorer needs, with the client's answer cache and counters:
    ``await chat(messages, max_tokens=..)`` (greedy) and ``await yes_no(messages)`` (margin).
    ``threads`` caps torch's intra-op threads (None: torch's default).
    """

    model_dir: str
    cache: AnswerCache
    gguf_file: str | None = None
    threads: int | None = None
    batch_size: int = 8
    stats: ClientStats = field(default_factory=ClientStats)

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.threads:
            torch.set_num_threads(self.threads)
        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True,
                                                       **extra)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, local_files_only=True, dtype=torch.float32, **extra).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.config = _Config(model=f"{self.model_dir}/{self.gguf_file or ''}".rstrip("/"))
        self._ids = {word: self._word_ids(word) for word in (YES, NO)}
        self._lock = asyncio.Lock()

    def _word_ids(self, word: str) -> list[int]:
        """Ids of the single-token spellings of ``word`` (yes, Yes, YES, with a leading space).

        Encoding the spellings, not decoding the vocabulary: Gemma 3's 262k-token vocabulary
        takes minutes to decode token by token on 2 cores.
        """
        ids = set()
        for spelling in (word, word.capitalize(), word.upper()):
            for text in (spelling, " " + spelling):
                enc = self.tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1 and answer_word(self.tokenizer.decode(enc)) == word:
                    ids.add(int(enc[0]))
        if not ids:
            raise ValueError(f"{self.config.model}: no token spells {word!r}")
        return sorted(ids)

    def render(self, messages: Messages) -> str:
        """Prompt text: the chat template, or "Role: text" turns for a base model without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True))
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def margins_now(self, prompts: Sequence[str]) -> list[float]:
        """log P(yes) - log P(no) of the next token after each prompt (batched, no cache)."""
        import torch

        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(list(prompts[i:i + self.batch_size]), return_tensors="pt",
                                   padding=True, add_special_tokens=False)
            with torch.inference_mode():
                # only the last position's logits: Gemma 3's 262k-token head would dominate
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1].double()  # [B, V]
            logp = torch.log_softmax(logits, dim=-1)
            yes = torch.logsumexp(logp[:, self._ids[YES]], dim=-1)
            no = torch.logsumexp(logp[:, self._ids[NO]], dim=-1)
            out += (yes - no).tolist()
        return out

    def generate_now(self, prompt: str, max_tokens: int) -> str:
        import torch

        batch = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ids = self.model.generate(**batch,  # type: ignore[attr-defined] max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return str(self.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:],
                                         skip_special_tokens=True))

    def _cached(self, kind: str, messages: Messages, params: dict[str, Any]) -> tuple[str, str | None]:
        key = cache_key(self.config.model, messages, {"kind": kind, **params})
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
        return key, hit

    async def chat(self, messages: Messages, **params: Any) -> str | None:
        """Greedy answer (``max_tokens``; temperature is ignored: always greedy)."""
        key, hit = self._cached("chat", messages, params)
        if hit is not None:
            return hit
        async with self._lock:
            self.stats.requests += 1
            text = self.generate_now(self.render(messages), int(params.get("max_tokens", 50)))
        self.cache.put(key, self.config.model, text)
        return text

    async def yes_no(self, messages: Messages) -> float | None:
        """The margin for one prompt (cached as its decimal text)."""
        return (await self.yes_no_many([messages]))[0]

    async def yes_no_many(self, batch: Sequence[Messages]) -> list[float | None]:
        keyed = [self._cached("yes_no", m, {}) for m in batch]
        todo = [i for i, (_, hit) in enumerate(keyed) if hit is None]
        if todo:
            async with self._lock:
                self.stats.requests += len(todo)
                fresh = self.margins_now([self.render(batch[i]) for i in todo])
            for i, value in zip(todo, fresh):
                self.cache.put(keyed[i][0], self.config.model, repr(value))
                keyed[i] = (keyed[i][0], repr(value))
        return [float(hit) if hit is not None else None for _, hit in keyed]
