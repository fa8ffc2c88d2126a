"""Chat data for causal LMs (edgeft.chat): the device renders conversations exactly as transformers'
apply_chat_template does, the loss falls on the assistant's tokens only (and prompt/completion rows on the
completion's), truncation is counted, bad rows are one clear line, and a chat bundle trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeft.chat import ChatTemplate, encode_examples, read_chat_template
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.errors import DataError
from edgeft.export.toy import CHATML_TEMPLATE, tiny_llama

# Llama 3 Instruct's template (BOS once, header tokens, content trimmed): a second family of real templates
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# a template that marks the assistant's part with transformers' generation tags and raises on bad roles
TAGGED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ 'Bot: ' }}{% generation %}{{ m['content'] | trim }}{{ eos_token }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ m['role'] | capitalize + ': ' + m['content'] | tojson + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Bot: ' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Good morrow, friend. "}, {"role": "user", "content": "And \"you\"?"},
     {"role": "assistant", "content": "I am well ✓"}],
]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("chat-llama"), TEXT, vocab_size=320, chat=True)


def hf_tokenizer(folder: Path, template: str):  # noqa: ANN201
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=template,
                                   bos_token="<|begin_of_text|>", eos_token="<|im_end|>")


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_TEMPLATE, TAGGED_TEMPLATE],
                         ids=["smollm2-chatml", "llama3", "generation-tags"])
def test_rendering_equals_transformers_apply_chat_template(chat_dir, template):
    ours = ChatTemplate(template, {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"})
    theirs = hf_tokenizer(chat_dir, template)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert ours.render(messages, add_generation_prompt=prompt) == theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_TEMPLATE, TAGGED_TEMPLATE],
                         ids=["smollm2-chatml", "llama3", "generation-tags"])
def test_only_the_assistant_tokens_carry_labels(chat_dir, template):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(chat_dir / "tokenizer.json"))
    ours = ChatTemplate(template, {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"})
    messages = CONVERSATIONS[1]
    encoding = encode_examples(tokenizer, [ours.assistant_spans(messages)], max_length=1000)
    ids, labels = encoding.ids[0], encoding.labels[0]
    learned = tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # exactly the assistant text (templates may trim it) and each turn's end marker, in order, nothing of the prompt
    ends = {CHATML_TEMPLATE: "\n", LLAMA3_TEMPLATE: "<|eot_id|>", TAGGED_TEMPLATE: "\n"}[template]
    assert learned.replace(" ", "") == "".join(a.strip() + ends for a in answers).replace(" ", "")
    assert (labels[labels != -100] == ids[labels != -100]).all()
    assert tokenizer.decode(ids[labels == -100].tolist()).count("Answer in verse.") == 1


def test_a_bundle_carries_its_chat_template_and_trains_on_chat_rows(tmp_path, chat_dir):
    from edgeft.export import export_hf
    from edgeft.train.engines import open_session

    config = ExportConfig(task="causal-lm", max_length=192, adapter=AdapterConfig(rank=4), engine="ort-training")
    bundle = export_hf(chat_dir, tmp_path / "bundle", config)
    assert bundle.manifest.tokenizer["chat_template"] == "chat_template.json"
    assert bundle.manifest.tokenizer["eos_token"] == "<|im_end|>"
    assert read_chat_template(chat_dir)["chat_template"] == CHATML_TEMPLATE
    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(8)]
    rows.append({"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "cut"}]})
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(DataConfig(data_file), bundle)
    assert len(data) == 8 and data.notes == {"examples": 9, "truncated": 0, "dropped": 1}  # the answer lay past 192
    batch = next(batches(data, 4, 0))
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"] == -100).mean() > 0.5
    session = open_session(bundle, threads=1)
    losses = []
    for _ in range(15):
        losses.append(session.train_step(batch)[0])
        session.optimizer_step(1e-2)
    assert losses[-1] < losses[0]


def test_prompt_completion_rows_learn_the_completion_and_its_end(tmp_path, chat_dir):
    from edgeft.export import export_hf

    config = ExportConfig(task="causal-lm", max_length=64, adapter=AdapterConfig(rank=4), engine="ort-training")
    bundle = export_hf(chat_dir, tmp_path / "bundle", config)
    data_file = tmp_path / "pc.jsonl"
    data_file.write_text(json.dumps({"prompt": "Who wrote Hamlet? ", "completion": "Shakespeare"}) + "\n")
    data = load_dataset(DataConfig(data_file), bundle)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(chat_dir / "tokenizer.json"))
    labels = data.labels[0]
    assert tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=False) == "Shakespeare<|im_end|>"


def test_bad_chat_rows_are_one_clear_line(tmp_path, chat_dir, tiny_gpt2_dir):
    from edgeft.export import export_hf

    config = ExportConfig(task="causal-lm", max_length=32, adapter=AdapterConfig(rank=4), engine="ort-training")
    bundle = export_hf(chat_dir, tmp_path / "bundle", config)

    def load(rows: list) -> object:
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_dataset(DataConfig(path), bundle)

    with pytest.raises(DataError, match="row 1: the conversation has no assistant turn"):
        load([{"messages": [{"role": "user", "content": "hello?"}]}])
    with pytest.raises(DataError, match="row 1: message 0 must be an object with a string 'role' and 'content'"):
        load([{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="row 2: expected 'messages'.*non-empty string 'completion'"):
        load([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    with pytest.raises(DataError, match="every example's answer lies beyond max_length=32"):
        load([{"messages": [{"role": "user", "content": "x " * 60}, {"role": "assistant", "content": "y"}]}])
    truncated = load([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "y " * 40}]}])
    assert truncated.notes["truncated"] == 1 and len(truncated.ids[0]) == 32
    plain = export_hf(tiny_gpt2_dir, tmp_path / "plain", config)  # a folder without a chat template
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    with pytest.raises(DataError, match="this bundle has none: its model folder has no chat_template"):
        load_dataset(DataConfig(path), plain)
    np.testing.assert_array_equal(plain.manifest.tokenizer.get("chat_template"), None)
