"""Chat data for causal language models: the model's own chat template, and the loss on the assistant's tokens only.

A Hugging Face tokenizer folder keeps its chat template (a Jinja template) in ``tokenizer_config.json``
(``chat_template``) or in ``chat_template.jinja``. Export copies it into the bundle (``chat_template.json``, with
the special tokens the template reads); the device renders conversations with it through jinja2 exactly as
transformers' ``apply_chat_template`` does (the same sandboxed environment, filters and globals), never importing
transformers.

Which characters the assistant wrote: a conversation rendered up to an assistant turn with the generation prompt
(``add_generation_prompt=True``) is a prefix of the conversation rendered through that turn, and the characters
between the two are the assistant's (its content and the template's end-of-turn marker, so the model learns to
stop). Tokens that start inside such a span carry labels; every other token is -100 (no loss). A template whose
renderings are not prefixes of each other is refused with a clear error.

Examples longer than the bundle's ``max_length`` are cut to it; an example whose assistant tokens all lie beyond the
cut is dropped. Both are counted (``ChatEncoding.truncated``, ``.dropped``) and reported by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeft.errors import DataError

CHAT_TEMPLATE_FILE = "chat_template.json"  # in a bundle: {"chat_template": str, "special_tokens": {name: str}}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """The special tokens a Hugging Face tokenizer folder names (``tokenizer_config.json``, then
    ``special_tokens_map.json``), as the strings a chat template reads (``bos_token``, ``eos_token``...)."""
    model_dir = Path(model_dir)
    sources = [json.loads(f.read_text(encoding="utf-8")) for f in (model_dir / "tokenizer_config.json",
                                                                     model_dir / "special_tokens_map.json")
               if f.is_file()]
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        for source in sources:
            value = source.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[key] = value
                break
    return tokens


def read_chat_template(model_dir: str | Path) -> dict | None:
    """A Hugging Face folder's chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``) and its special tokens, as a bundle stores them (``CHAT_TEMPLATE_FILE``); None without one."""
    model_dir = Path(model_dir)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    return {"chat_template": template, "special_tokens": special_tokens(model_dir)}


class ChatTemplate:
    """A chat template rendered as transformers renders it (``apply_chat_template(..., tokenize=False)``)."""

    def __init__(self, template: str, special_tokens: Mapping[str, str] | None = None):
        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # noqa: ANN001, ANN202
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as exc:
            raise DataError(f"the bundle's chat template does not parse: {exc}") from exc
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dict(cls, data: Mapping) -> ChatTemplate:
        return cls(data["chat_template"], data.get("special_tokens"))

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=list(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise DataError(f"the chat template refuses this conversation: {exc}") from exc

    def assistant_spans(self, messages: Sequence[Mapping]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans the assistant turns produced."""
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError("this chat template does not render a conversation as a prefix of its longer "
                                "renderings, so edgeft cannot tell the assistant's tokens from the prompt's; use "
                                "prompt/completion data instead")
            spans.append((len(before), len(through)))
        return text, spans


class _GenerationTag(Extension):
    """Accepts transformers' ``{% generation %}...{% endgeneration %}`` blocks (they render their body)."""

    tags = {"generation"}

    def parse(self, parser):  # noqa: ANN001, ANN201
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):  # noqa: ANN001, ANN202
        return caller()


@dataclass
class ChatEncoding:
    """Token ids and labels (-100 where there is no loss) per kept example, and what truncation did."""

    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0  # kept, cut to max_length with part of an answer lost
    dropped: int = 0  # every answer token lay beyond max_length


def check_messages(messages: object, where: str) -> list[dict]:
    """A conversation as a list of {"role", "content"} dicts with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with a string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it "
                        "(the loss is on the assistant's tokens only)")
    return messages


def label_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Token ids of ``text`` (no special tokens added: the template writes them) and their labels: the id for
    tokens starting inside a span, -100 elsewhere."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
    inside = np.zeros(len(ids), dtype=bool)
    for begin, end in spans:
        inside |= (starts >= begin) & (starts < end)
    return ids, np.where(inside, ids, IGNORE_INDEX)


def encode_examples(tokenizer, examples: Sequence[tuple[str, list[tuple[int, int]]]],  # noqa: ANN001
                    max_length: int) -> ChatEncoding:
    """Tokenise rendered examples with their answer spans, cut each to ``max_length`` tokens (counting what that
    costs)."""
    out = ChatEncoding()
    for text, spans in examples:
        ids, labels, lost = cut_to(*label_tokens(tokenizer, text, spans), max_length)
        if not (labels != IGNORE_INDEX).any():
            out.dropped += 1
            continue
        out.truncated += int(lost)
        out.ids.append(ids)
        out.labels.append(labels)
    return out


def cut_to(ids: np.ndarray, labels: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The first ``max_length`` tokens and labels, and whether the cut lost labelled (answer) tokens."""
    lost = len(ids) > max_length and bool((labels[max_length:] != IGNORE_INDEX).any())
    return ids[:max_length], labels[:max_length], lost


def truncation_note(notes: Mapping) -> str | None:
    """One line on what ``max_length`` cost a dataset (its ``notes``: examples, truncated, dropped), or None."""
    if not notes.get("truncated") and not notes.get("dropped"):
        return None
    return (f"{notes['truncated']} of {notes['examples']} examples cut to the bundle's max_length with part of their "
            f"answer lost; {notes['dropped']} dropped (their whole answer lay beyond it)")


def bundle_template(bundle) -> ChatTemplate | None:  # noqa: ANN001  (edgeft.bundle.Bundle)
    """The chat template a causal-LM bundle carries (``manifest.tokenizer["chat_template"]``), or None."""
    name = (bundle.manifest.tokenizer or {}).get("chat_template")
    if not name:
        return None
    return ChatTemplate.from_dict(json.loads(bundle.file(name).read_text(encoding="utf-8")))


def encode_rows(rows: Sequence[Mapping], source: object, bundle, tokenizer, max_length: int  # noqa: ANN001
                ) -> ChatEncoding:
    """Chat rows (``messages``: a conversation, rendered with the bundle's chat template) or prompt/completion rows
    (``prompt`` + ``completion`` + the end-of-sequence token, as TRL joins them), tokenised with labels on the
    assistant's or the completion's tokens only, cut to ``max_length``."""
    template = bundle_template(bundle)
    eos = (bundle.manifest.tokenizer or {}).get("eos_token") or ""
    examples = []
    for number, row in enumerate(rows, 1):
        where = f"{source} row {number}"
        if "messages" in row:
            if template is None:
                raise DataError(f"{where}: chat rows ('messages') need the model's chat template, and this bundle "
                                "has none: its model folder has no chat_template in tokenizer_config.json (or "
                                "chat_template.jinja). Add the template to the folder and export again, or give "
                                "prompt/completion rows")
            examples.append(template.assistant_spans(check_messages(row["messages"], where)))
            continue
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError(f"{where}: expected 'messages' (a conversation) or a string 'prompt' and a non-empty "
                            "string 'completion'")
        text = prompt + completion + eos
        examples.append((text, [(len(prompt), len(text))]))
    encoding = encode_examples(tokenizer, examples, max_length)
    if not encoding.ids:
        raise DataError(f"{source}: every example's answer lies beyond max_length={max_length} tokens, so nothing "
                        "is left to learn from; export the bundle with a larger --max-length or shorten the prompts")
    return encoding
