"""Hugging Face transformers on the same model object, in the same process: the peers Diptych is measured against.

The model is switched to transformers' ``sdpa`` attention for these calls and back to Diptych's paged attention
afterwards (``hf_attention``), so both sides run the very same weights.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import TYPE_CHECKING

import torch

from diptych.benchmarks.common import median, sync, time_call

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@contextlib.contextmanager
def hf_attention(model: PreTrainedModel, implementation: str = "sdpa"):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def _generate(model, input_ids: torch.Tensor, new_tokens: int, **kwargs):
    return model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs,
    )


@torch.inference_mode()
def generate_step_seconds(model, batch: int, context: int, steps: int, vocab: int, device) -> float:
    """Seconds per decode step of ``generate`` (greedy) for ``batch`` prompts of ``context`` tokens: the time of
    ``1 + steps`` new tokens minus that of 1 (the prefill), over ``steps``."""
    generator = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(3, vocab, (batch, context), generator=generator).to(device)
    with hf_attention(model):
        _generate(model, input_ids[:, :16], 2)  # warm-up
        prefill = median(time_call(lambda: _generate(model, input_ids, 1), device, repeats=1, warmup=0))
        total = median(time_call(lambda: _generate(model, input_ids, 1 + steps), device, repeats=1, warmup=0))
    return max(total - prefill, 0.0) / steps


@torch.inference_mode()
def forward_seconds(model, tokens: int, vocab: int, device, repeats: int = 5) -> float:
    """One forward pass over a single prompt of ``tokens`` tokens (logits of the last token only), median."""
    input_ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens)).to(device)
    with hf_attention(model):
        return median(time_call(lambda: model(input_ids=input_ids, logits_to_keep=1), device, repeats=repeats))


@torch.inference_mode()
def greedy_with_scores(model, prompts: list[list[int]], new_tokens: int, device, implementation: str = "sdpa"
                       ) -> tuple[list[list[int]], list]:
    """HF greedy tokens per prompt (one at a time, no padding) and each step's logits ``[vocab]`` (float32)."""
    tokens, scores = [], []
    with hf_attention(model, implementation):
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = _generate(model, ids, new_tokens, output_scores=True, return_dict_in_generate=True)
            tokens.append(out.sequences[0, len(prompt):].tolist())
            scores.append([s[0].float().cpu() for s in out.scores])
    return tokens, scores


class _Timeout(Exception):
    pass


def generate_batch_tokens_per_s(model, batch: int, context: int, new_tokens: int, vocab: int, device,
                                timeout_s: int = 60) -> tuple[float | None, str]:
    """HF continuous batching (``generate_batch``) throughput, prefill included: ``(tokens/s, note)``; None with
    the reason when it does not run here."""
    if not hasattr(model, "generate_batch"):
        return None, "transformers has no generate_batch"
    from transformers import GenerationConfig

    generator = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, vocab, (batch, context), generator=generator).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=None)

    def alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout_s)
    implementation = model.config._attn_implementation
    try:
        model.set_attn_implementation("sdpa")
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        sync(device)
        elapsed = time.perf_counter() - start
        generated = sum(len(getattr(o, "generated_tokens", []) or []) for o in outputs.values())
        if not generated:
            return None, f"no tokens generated ({len(outputs)} outputs in {elapsed:.2f} s): requests failed"
        return generated / elapsed, f"{generated} tokens in {elapsed:.2f} s, prefill included"
    except _Timeout:
        return None, f"did not finish in {timeout_s} s"
    except Exception as exc:  # noqa: BLE001 (a peer's API that changes between versions: report, don't crash)
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        model.set_attn_implementation(implementation)
