"""Reference outputs from Hugging Face ``generate`` for exactness tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def hf_greedy(model_path: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Hugging Face greedy continuations of ``prompts`` (one left-padded batch, eager attention, EOS ignored)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    width = max(len(prompt) for prompt in prompts)
    pad = model.generation_config.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        generated = model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=new_tokens)
    return generated[:, width:].tolist()
