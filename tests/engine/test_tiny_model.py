"""Tiny models: loadable with the Auto classes, deterministic, byte-level tokenizer that round-trips any text."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from diptych.engine import build_tiny_model, default_model_path
from diptych.engine.tiny_model import DEFAULT_MODEL_DIRNAME, build_byte_tokenizer, resolve_model

BYTE_TOKENIZER = build_byte_tokenizer()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_saved_model_and_tokenizer_load_with_auto_classes(family, request):
    path = request.getfixturevalue(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.vocab_size == len(tokenizer) == {"tiny_llama": 259, "tiny_qwen2": 260}[family]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("hi").input_ids
    assert ids == [1, 3 + ord("h"), 3 + ord("i")]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<s>user: hi\nassistant: "


def test_weights_are_deterministic(tmp_path, tiny_llama):
    rebuilt = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "again", family="llama"))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for (name, a), (_, b) in zip(original.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("text", ["", "plain ascii", "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧", "中文字符 日本語 한국어",
                                  " leading  spaces\tand\nnewlines ", "é\u0301 combining, \x00 nul"])
def test_tokenizer_round_trips_examples(text):
    ids = BYTE_TOKENIZER(text).input_ids
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert BYTE_TOKENIZER.decode(ids, skip_special_tokens=True) == text


SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    """Any text without a special token's spelling (which, as in every HF tokenizer, becomes that token)."""
    assume(not any(special in text for special in SPECIAL_TOKENS))
    assert BYTE_TOKENIZER.decode(BYTE_TOKENIZER(text).input_ids, skip_special_tokens=True) == text


def test_default_model_path_builds_once_under_concurrent_callers(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPTYCH_CACHE", str(tmp_path))
    results, errors = [], []

    def call():
        try:
            results.append(default_model_path())
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = str(tmp_path / "models" / DEFAULT_MODEL_DIRNAME)
    assert results == [expected] * 4
    assert [p.name for p in (tmp_path / "models").iterdir()] == [DEFAULT_MODEL_DIRNAME]  # no staging dirs left
    assert resolve_model(None) == expected and resolve_model("org/model") == "org/model"
    AutoModelForCausalLM.from_pretrained(expected)
