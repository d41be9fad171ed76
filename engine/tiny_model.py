"""Tiny random-weight decoder models with a byte-level tokenizer, for tests and for running without downloads.

Their output is random bytes, not text: the weights are random (``diptych serve`` says so when it serves one).

A tiny model directory loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
Its weights depend only on ``(family, seed, config overrides)``. The tokenizer maps every UTF-8 byte to one token
(byte-level BPE over the 256-byte alphabet with no merges), so any text round-trips; ids 0, 1, 2 are ``<pad>``,
``<s>`` (bos, prepended by the tokenizer) and ``</s>`` (eos), and byte value ``b`` is id ``3 + b``.

Caveat for the "qwen2" family: transformers' ``AutoTokenizer`` always loads ``Qwen2Tokenizer`` for that model type
(whatever tokenizer_config.json says); it keeps these ids but applies NFC normalization, so only NFC text
round-trips exactly, and it registers ``<|endoftext|>``, which the qwen2 tiny vocabulary therefore includes (id
259). Special-token strings inside text (e.g. a literal ``</s>``) are parsed as those tokens, as in every Hugging
Face tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
"""In id order: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2."""

DEFAULT_MODEL_DIRNAME = "tiny-llama-v1"
"""Bump the suffix whenever ``build_tiny_model``'s output changes, so stale caches are not reused."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

_FAMILY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}

_FAMILY_EXTRA_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {"qwen2": ("<|endoftext|>",)}
"""Tokens the family's forced transformers tokenizer class registers; in the vocabulary so every id embeds."""

_TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.2,
    tie_word_embeddings=False,
)
"""Grouped-query attention (4 query heads share 2 KV heads). The large ``initializer_range`` makes random logits
well separated, so greedy decoding is not decided by rounding noise."""


def _byte_symbols() -> list[str]:
    """The printable symbol the ByteLevel pre-tokenizer uses for each byte value 0..255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in range(256)]


def build_byte_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte, ``<s>`` prepended, and a plain-text chat template.
    ``extra_special_tokens`` get the ids after the 256 byte tokens."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in [*_byte_symbols(), *extra_special_tokens]:
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.add_special_tokens([*SPECIAL_TOKENS, *extra_special_tokens])
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(family: str, vocab_size: int, **config_overrides) -> PretrainedConfig:
    """The tiny config of ``family`` ("llama", "qwen2", "mistral"); ``config_overrides`` replace any field."""
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(_FAMILY_CONFIGS)}")
    fields: dict[str, Any] = dict(
        _TINY_SHAPE,
        vocab_size=vocab_size,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
    )
    if family == "mistral":
        fields["sliding_window"] = None
    fields.update(config_overrides)
    return _FAMILY_CONFIGS[family](**fields)


def build_tiny_model(path: str | os.PathLike, family: str = "llama", seed: int = 0, *,
                     dtype: torch.dtype = torch.float32, device: str = "cpu", **config_overrides) -> str:
    """Write a tiny random-weight model of ``family`` and its byte-level tokenizer to ``path``; returns the path.
    ``config_overrides`` may give it a real model's shape (``device="cuda"`` and ``dtype=torch.bfloat16`` then
    build a 7B-parameter one in seconds).

    The weights are a function of ``seed``, the config and the device only (the global CPU RNG is left untouched).
    """
    tokenizer = build_byte_tokenizer(_FAMILY_EXTRA_SPECIAL_TOKENS.get(family, ()))
    config = tiny_config(family, vocab_size=len(tokenizer), **config_overrides)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def cache_root() -> Path:
    """``$DIPTYCH_CACHE`` or ``~/.cache/diptych``."""
    return Path(os.environ.get("DIPTYCH_CACHE") or Path.home() / ".cache" / "diptych")


def default_model_path() -> str:
    """The built-in tiny Llama under ``cache_root()/models``, built on first use.

    Safe when several processes call it at once: each builds into its own temporary directory and moves it into
    place with one atomic ``os.rename``; a process that loses the race discards its copy and uses the winner's.
    """
    final = cache_root() / "models" / DEFAULT_MODEL_DIRNAME
    if final.is_dir():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.", dir=final.parent)
    try:
        build_tiny_model(staging, family="llama", seed=0)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def resolve_model(model: str | None) -> str:
    """The path or hub id to load: ``model`` itself, or the built-in tiny Llama when ``model`` is None."""
    return default_model_path() if model is None else model
