"""Token sampling per request: greedy, temperature, top-k and top-p.

Reproducibility: a request with ``SamplingParams.seed`` draws its output token ``k`` (0-based index among its
outputs) from a generator seeded by ``(seed, k)`` only, so the token does not depend on the batch it ran in, on
other requests, or on which worker sampled it (the prefill worker samples ``k = 0``, a decode worker the rest).
Requests without a seed draw from the engine's generator. Random draws happen on the CPU in float64.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from diptych.proto.messages import SamplingParams


@dataclass
class SamplingRequest:
    """One row of logits to sample: the request's parameters and the output index of the token being drawn."""

    params: SamplingParams
    output_index: int


def seeded_generator(seed: int, output_index: int) -> torch.Generator:
    """The CPU generator for output token ``output_index`` of a request seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


class Sampler:
    """Samples one token per logits row. ``seed`` seeds the generator of requests without their own seed."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> list[int]:
        """``logits`` is ``[len(requests), vocab]`` (any device and dtype); returns one token id per row."""
        if logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(requests)} sampling requests")
        tokens = _to_host(logits.argmax(dim=-1)).tolist()
        drawn = [row for row, request in enumerate(requests) if request.params.temperature > 0]
        if drawn:
            rows = _to_host(logits[torch.tensor(drawn, device=logits.device)].double())
            for index, row in enumerate(drawn):
                tokens[row] = self._draw(rows[index], requests[row])
        return tokens

    def _draw(self, row_logits: torch.Tensor, request: SamplingRequest) -> int:
        params = request.params
        probs = filtered_probabilities(row_logits, params.temperature, params.top_k, params.top_p)
        generator = (
            seeded_generator(params.seed, request.output_index) if params.seed is not None else self._generator
        )
        uniform = torch.rand((), generator=generator, dtype=torch.float64)
        cumulative = probs.cumsum(0)
        choice = int(torch.searchsorted(cumulative, uniform * cumulative[-1], right=True))
        return min(choice, probs.shape[0] - 1)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU; from CUDA through pinned memory (the iteration's one synchronisation)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def filtered_probabilities(row_logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of ``row_logits / temperature`` restricted to the ``top_k`` most likely tokens (0 = all) and then to
    the smallest most-likely set whose probability reaches ``top_p`` (1 = all), renormalized. CPU float64 ``[vocab]``;
    the most likely token always survives."""
    scaled = row_logits.detach().to(device="cpu", dtype=torch.float64) / temperature
    if 0 < top_k < scaled.shape[0]:
        kth_largest = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probs = torch.softmax(scaled, dim=0)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        drop = mass_before >= top_p
        drop[0] = False
        probs = probs.clone()
        probs[order[drop]] = 0
        probs = probs / probs.sum()
    return probs
