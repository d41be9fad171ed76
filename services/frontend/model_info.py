"""The served model as the frontend sees it: its name, tokenizer and context length. No weights are loaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from diptych.services.frontend.api_errors import bad_request

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """``max_model_len`` counts prompt plus output tokens; valid token ids are ``0 <= id < vocab_size``."""

    name: str
    tokenizer: Any
    max_model_len: int
    vocab_size: int

    @classmethod
    def load(cls, path: str, name: str, max_model_len: int | None = None) -> ModelInfo:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        native = getattr(config, "max_position_embeddings", None)
        if max_model_len is None:
            if native is None:
                raise ValueError(f"{path}: config has no max_position_embeddings; pass --max-model-len")
            max_model_len = native
        elif native is not None and max_model_len > native:
            log.warning("max_model_len=%d exceeds the model's max_position_embeddings=%d", max_model_len, native)
        vocab_size = getattr(config, "vocab_size", None) or len(tokenizer)
        return cls(name=name, tokenizer=tokenizer, max_model_len=max_model_len, vocab_size=vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the tokenizer's special tokens (e.g. BOS)."""
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered by the chat template, ending with the assistant's turn prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"model {self.name!r} has no chat template; use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 (jinja templates raise arbitrary errors for conversations they refuse)
            raise bad_request(f"chat template rejected the messages: {exc}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)
