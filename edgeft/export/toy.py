"""Tiny Hugging Face model folders built from a config, for fast tests and examples (random weights).

Each folder has config.json, model.safetensors and tokenizer.json, like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_bert(directory: str | Path, tokenizer_file: str | Path, num_labels: int = 2, seed: int = 0,
              sentence_pooling: str | None = None) -> Path:
    """A 2-layer, 32-wide BERT for sequence classification using an existing WordPiece tokenizer.json.

    With ``sentence_pooling`` (``mean``, ``cls``, ``max``...) the folder is also a sentence-transformers model
    (modules.json: Transformer, Pooling with that mode, Normalize), like all-MiniLM-L6-v2."""
    import json

    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    directory = Path(directory)
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        initializer_range=0.2)  # wide enough that a random body tells inputs apart
    BertForSequenceClassification(config).save_pretrained(directory)
    Tokenizer.from_file(str(tokenizer_file)).save(str(directory / "tokenizer.json"))
    if sentence_pooling:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (directory / "modules.json").write_text(json.dumps(modules, indent=2))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        from edgeft.export.source import POOLING_MODES

        pooling = {"word_embedding_dimension": config.hidden_size,
                   **{key: mode == sentence_pooling for key, mode in POOLING_MODES.items()}}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    return directory


def tiny_distilbert(directory: str | Path, tokenizer_file: str | Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer, 32-wide DistilBERT (2 heads) for sequence classification using an existing WordPiece
    tokenizer.json. Its Linear modules: q_lin, k_lin, v_lin, out_lin, ffn.lin1, ffn.lin2, pre_classifier,
    classifier (PEFT has no default LoRA target for DistilBERT: name them)."""
    from tokenizers import Tokenizer
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    directory = Path(directory)
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128, num_labels=num_labels, initializer_range=0.2)
    DistilBertForSequenceClassification(config).save_pretrained(directory)
    Tokenizer.from_file(str(tokenizer_file)).save(str(directory / "tokenizer.json"))
    return directory


# SmolLM2-Instruct's chat template (ChatML with a default system prompt): what tiny_llama(chat=True) carries
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_level_bpe(directory: Path, text: str, vocab_size: int, special: str | tuple[str, ...] = "<|endoftext|>"
                   ) -> int:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``text`` into ``directory``/tokenizer.json; returns
    its vocabulary size. The ``special`` token(s) get the first ids (0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [special] if isinstance(special, str) else list(special)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return int(tokenizer.get_vocab_size())


def tiny_gpt2(directory: str | Path, text: str, vocab_size: int = 512, seed: int = 0,
              n_embd: int = 64, n_layer: int = 2, initializer_range: float = 0.02) -> Path:
    """A small GPT-2 with a byte-level BPE tokenizer trained on ``text``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_bpe(directory, text, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=n_embd, n_layer=n_layer,
                        n_head=4, bos_token_id=0, eos_token_id=0, initializer_range=initializer_range)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def tiny_llama(directory: str | Path, text: str, vocab_size: int = 512, seed: int = 0, hidden_size: int = 64,
               num_hidden_layers: int = 2, initializer_range: float = 0.02, chat: bool = False) -> Path:
    """A small Llama-architecture decoder (RMSNorm, rotary position embeddings, grouped-query attention with
    4 query heads sharing 2 key/value heads, SwiGLU MLP) with a byte-level BPE tokenizer trained on ``text``.
    Its Linear modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head. With ``chat``
    the tokenizer has ChatML's special tokens and tokenizer_config.json SmolLM2-Instruct's chat template
    (``CHATML_TEMPLATE``; end of sequence ``<|im_end|>``), as an instruct checkpoint's folder has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _decoder(directory, text, vocab_size, seed, chat, LlamaForCausalLM, LlamaConfig, tie_word_embeddings=False,
                    hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, initializer_range=initializer_range)


def tiny_qwen2(directory: str | Path, text: str, vocab_size: int = 512, seed: int = 0, hidden_size: int = 64,
               num_hidden_layers: int = 2, chat: bool = False) -> Path:
    """A small Qwen2-architecture decoder: Llama's blocks with biases on the query, key and value projections,
    and the output layer tied to the embeddings (as Qwen2.5-0.5B), with a byte-level BPE tokenizer (``chat``: as
    ``tiny_llama``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _decoder(directory, text, vocab_size, seed, chat, Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True,
                    hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_sliding_window=False)


def tiny_phi3(directory: str | Path, text: str, vocab_size: int = 512, seed: int = 0, hidden_size: int = 64,
              num_hidden_layers: int = 2, chat: bool = False) -> Path:
    """A small Phi-3-architecture decoder: Llama's blocks with the query, key and value projections fused into one
    ``qkv_proj`` and the gate and up projections into one ``gate_up_proj`` (as Phi-3-mini; untied output layer),
    with a byte-level BPE tokenizer (``chat``: as ``tiny_llama``). Its Linear modules: qkv_proj, o_proj,
    gate_up_proj, down_proj, lm_head."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return _decoder(directory, text, vocab_size, seed, chat, Phi3ForCausalLM, Phi3Config, tie_word_embeddings=False,
                    hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)


def _decoder(directory: str | Path, text: str, vocab_size: int, seed: int, chat: bool, model_class, config_class,
             **overrides: object) -> Path:  # noqa: ANN001
    """A decoder folder: tokenizer.json (and with ``chat`` a ChatML tokenizer_config.json), config and weights."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_bpe(directory, text, vocab_size, CHAT_SPECIAL_TOKENS if chat else "<|endoftext|>")
    if chat:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": CHATML_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
             "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    torch.manual_seed(seed)
    hidden = int(overrides.pop("hidden_size"))
    config = config_class(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, hidden_act="silu", rms_norm_eps=1e-6,
                          rope_theta=10000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides)
    model_class(config).save_pretrained(directory)
    return directory
