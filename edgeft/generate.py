"""Text generation with a causal-LM deployment package, on plain ``onnxruntime`` (no torch, no transformers).

``edgeft deploy`` exports a causal LM's decoder with its KV cache (``past_key_values.*`` in, ``present.*`` out) where
optimum supports the architecture: the prompt runs once (prefill), then each new token runs alone against the cache.
A package without a cache recomputes the whole sequence for every token (the same tokens, slower). Decoding: greedy
(``temperature=0``), or sampling with a temperature and nucleus (top-p) filtering from a seeded generator; it stops
at the end-of-sequence token, at a stop string or after ``max_new_tokens``. A chat package renders a conversation
(or a single user message) with the model's chat template and the generation prompt first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edgeft.errors import ConfigError
from edgeft.predict import Predictor, empty_cache


@dataclass
class Generation:
    """What one call produced: the new text and tokens, why it stopped, and how fast."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    stopped_by: str  # "eos", "stop string" or "max_new_tokens"
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second after the prompt (the first token comes from the prefill)."""
        return (len(self.tokens) - 1) / self.decode_seconds if len(self.tokens) > 1 and self.decode_seconds else 0.0


class Generator:
    """A causal-LM package, ready to generate."""

    def __init__(self, package_dir: str | Path, threads: int | None = None, provider: str | None = None):
        self.predictor = Predictor(package_dir, provider=provider, threads=threads)
        meta = self.predictor.meta
        if meta.get("task") != "causal-lm":
            raise ConfigError(f"{package_dir} is a {meta.get('task')} package; edgeft generate needs a causal-LM "
                              "package (edgeft deploy of a causal-LM bundle)")
        self.tokenizer = self.predictor.tokenizer
        self.session = self.predictor.session
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.kv_cache = any(name.startswith("past_key_values.") for name in self.predictor.input_names)
        eos = meta.get("eos_token")
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None
        self.template = None
        if meta.get("chat_template"):
            from edgeft.chat import ChatTemplate

            self.template = ChatTemplate.from_dict(json.loads((Path(package_dir) / meta["chat_template"]).read_text()))

    def prompt_ids(self, prompt: str | Sequence[Mapping], chat: bool | None = None) -> list[int]:
        """The prompt's token ids: a conversation (or, with ``chat``, a string as one user message) rendered with
        the chat template and its generation prompt; a string as it is otherwise. ``chat=None``: chat when the
        package has a template."""
        messages = None if isinstance(prompt, str) else list(prompt)
        chat = (self.template is not None) if chat is None else chat
        if messages is not None or chat:
            if self.template is None:
                raise ConfigError("this package has no chat template (its model folder had none): give a plain "
                                  "prompt (--no-chat)")
            messages = messages if messages is not None else [{"role": "user", "content": prompt}]
            text = self.template.render(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt).ids

    def generate(self, prompt: str | Sequence[Mapping], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0, chat: bool | None = None,
                 use_cache: bool = True) -> Generation:
        """Continue ``prompt`` (see ``prompt_ids``) by at most ``max_new_tokens`` tokens."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")
        ids = self.prompt_ids(prompt, chat)
        if not ids:
            raise ConfigError("the prompt is empty")
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        stopped_by = "max_new_tokens"
        started = time.perf_counter()
        cache = None
        prefill = 0.0
        for step in range(max_new_tokens):
            logits, cache = self._next_logits(ids, tokens, cache, use_cache and self.kv_cache)
            if step == 0:
                prefill = time.perf_counter() - started
            token = _pick(logits, temperature, top_p, rng)
            if token == self.eos_id:
                stopped_by = "eos"
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            hit = next((s for s in stop if s and s in text), None)
            if hit is not None:
                stopped_by = "stop string"
                return Generation(text[: text.index(hit)], tokens, len(ids), stopped_by, prefill,
                                  time.perf_counter() - started - prefill)
        return Generation(self.tokenizer.decode(tokens), tokens, len(ids), stopped_by, prefill,
                          time.perf_counter() - started - prefill)

    def _next_logits(self, prompt: list[int], tokens: list[int], cache: dict | None, use_cache: bool
                     ) -> tuple[np.ndarray, dict | None]:
        """The next token's logits [vocab] and the KV cache after it (None without one)."""
        full = np.asarray([prompt + tokens], dtype=np.int64)
        mask = np.ones_like(full)
        if use_cache and cache is not None:  # one new token against the cache
            feed = {"input_ids": full[:, -1:], "attention_mask": mask, **cache}
            if "position_ids" in self.predictor.input_names:
                feed["position_ids"] = np.asarray([[full.shape[1] - 1]], dtype=np.int64)
        else:  # the whole sequence (prefill, or every step without a cache)
            feed = {"input_ids": full, "attention_mask": mask}
            feed.update({k: v for k, v in empty_cache(self.session, mask).items() if k in self.predictor.input_names})
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        cache = ({name.replace("present.", "past_key_values."): value for name, value in outputs.items()
                  if name.startswith("present.")} if use_cache else None)
        return outputs["logits"][0, -1], cache


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise a draw from softmax(logits / temperature) kept to the smallest set of
    tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))
