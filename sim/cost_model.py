"""Iteration cost model: how long one engine iteration (a forward pass over a packed batch) takes, in seconds.

Form (DistServe's prefill ``a + b*tokens + c*tokens^2`` and decode ``a + b*context + c*batch``, joined into one
roofline-shaped expression for mixed batches)::

    T     = prefill_tokens + num_decodes                       # tokens through the linear layers
    q(T)  = ceil(T / tile_quantum) * tile_quantum              # matmul tile quantisation
    time  = overhead_s
          + max(weights_floor_s, per_token_s * q(T))           # weights read (memory-bound) vs matmul compute
          + attn_pair_s * prefill_attn_pairs                   # prefill attention, quadratic in the prompt
          + kv_token_s * decode_context_tokens                 # decode attention reads every cached KV byte
          + per_seq_s * num_seqs                               # per-sequence overhead (sampling, block tables)

``prefill_attn_pairs`` counts causal (query, key) pairs of the prefill chunks: a chunk of ``c`` tokens starting at
position ``s`` has ``c*s + c*(c+1)/2`` pairs, so a whole prompt of ``L`` tokens has about ``L^2/2`` (DistServe's
``c*tokens^2``). ``decode_context_tokens`` is the sum over decodes of the tokens each attends to (prompt plus
outputs so far). An empty batch takes 0 s.

Default (``DEFAULT``, preset ``h200-mistral-7b``): a Mistral-7B-shaped model (7.24e9 parameters, 32 layers, 32 query
heads, 8 KV heads, head_dim 128, bf16) on one H200, from the figures measured on the lent machines
(``workloads.md``, "Hardware limits"):

- ``weights_floor_s = 3.4 ms``: 14.5 GB of weights read once per iteration at the measured 4.26 TB/s copy rate;
- ``kv_token_s = 131072 B / 3.2 TB/s = 41 ns``: 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 bytes per cached token,
  read at ~75% of the copy rate (what tuned engines reach in decode);
- ``per_token_s = 2 * 7.24e9 FLOP / 550 TFLOP/s = 26.3 us``: ~69% of the measured 799 TFLOP/s dense bf16 matmul
  (HF's own prefill reached 494 TFLOP/s in the linear layers; tuned engines ~75% of peak). The ridge where compute
  passes the weights floor is ``3.4 ms / 26.3 us = 129`` tokens;
- ``attn_pair_s = 4 * 32 layers * 4096 (heads * head_dim) FLOP / 550 TFLOP/s = 0.95 ns`` per causal pair;
- ``tile_quantum = 64``: a 257-token chunk then costs ~24% more than 256 (Sarathi-Serve measured up to 32%);
- ``overhead_s = 0.3 ms`` (scheduler and launch overhead with CUDA graphs), ``per_seq_s = 0``.

So a batch-32 decode at 4k context takes 0.3 + 3.4 + 32*4096*41e-6 = 9.1 ms, a 2048-token prompt
0.3 + 53.9 + 2.0 = 56 ms. Other presets (``PRESETS``) scale bandwidth and compute by datasheet ratios to the H200
(4.8 TB/s, 989 TFLOP/s dense bf16); they are estimates until measured samples are fitted with ``CostModel.fit``.

Fitting: ``CostModel.fit(samples)`` takes a list of dicts, one per measured iteration::

    {"prefill_tokens": 512, "num_decodes": 0, "decode_context_tokens": 0, "seconds": 0.0151,
     "prefill_chunks": [[512, 0]]}            # optional: [tokens, start position] per chunk, for attention pairs

Keys: ``seconds`` (measured wall time of the iteration, required), ``prefill_tokens``, ``num_decodes``,
``decode_context_tokens`` (default 0), and optionally ``prefill_attn_pairs`` or ``prefill_chunks`` (without either,
the prefill tokens are taken as one prompt starting at position 0) and ``num_seqs`` (default: number of chunks plus
decodes). The fit is non-negative least squares on the linear terms, with the weights floor found by a search over
the ridge point; every fifth sample is held out to report the error, then the model is refitted on all samples.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "diptych-cost-model/1"


@dataclass(frozen=True)
class ModelShape:
    """What the cost and KV size depend on. ``dtype_bytes`` of the KV cache and weights. ``max_model_len``: the
    model's context in tokens (its config's ``max_position_embeddings``; None when unknown, as in cost model files
    saved before the field existed)."""

    name: str
    num_params: float
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    dtype_bytes: int = 2
    max_model_len: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """``2 * layers * kv_heads * head_dim * dtype_bytes`` (K and V of every layer): 131072 for Mistral-7B."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> float:
        """QK^T and PV: 2 matmuls x 2 FLOP per multiply-add x query width, per layer."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim


MISTRAL_7B = ModelShape("mistral-7b", 7.24e9, 32, 32, 8, 128, max_model_len=32768)
LLAMA2_7B = ModelShape("llama-2-7b", 6.74e9, 32, 32, 32, 128, max_model_len=4096)
MODEL_SHAPES = {shape.name: shape for shape in (MISTRAL_7B, LLAMA2_7B)}


@dataclass(frozen=True)
class CostModel:
    """Seconds per iteration; see the module docstring for the form. Immutable: ``replace`` to vary a knob."""

    overhead_s: float
    weights_floor_s: float
    per_token_s: float
    attn_pair_s: float
    kv_token_s: float
    per_seq_s: float = 0.0
    tile_quantum: int = 1
    device: str = "unknown"
    model: ModelShape = MISTRAL_7B
    gpu_memory_bytes: float = 80e9
    source: str = "derived"
    date: str = ""
    fit_error: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("overhead_s", "weights_floor_s", "per_token_s", "attn_pair_s", "kv_token_s", "per_seq_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost model {name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.tile_quantum, int) or self.tile_quantum < 1:
            raise ValueError(f"tile_quantum must be a positive integer, got {self.tile_quantum!r}")

    # ------------------------------------------------------------------ evaluation

    def quantize(self, tokens: int) -> int:
        q = self.tile_quantum
        return -(-tokens // q) * q

    def iteration_time(self, prefill_tokens: int = 0, num_decodes: int = 0, decode_context_tokens: float = 0,
                       prefill_attn_pairs: float | None = None, num_seqs: int | None = None) -> float:
        """Seconds for one iteration. ``prefill_attn_pairs`` None: the prefill tokens are one prompt from position
        0 (``p*(p+1)/2`` pairs). ``num_seqs`` None: ``num_decodes`` plus one prefill sequence if any."""
        tokens = prefill_tokens + num_decodes
        if tokens <= 0:
            return 0.0
        if prefill_attn_pairs is None:
            prefill_attn_pairs = prefill_tokens * (prefill_tokens + 1) / 2
        if num_seqs is None:
            num_seqs = num_decodes + (1 if prefill_tokens else 0)
        compute = self.per_token_s * self.quantize(tokens)
        return (self.overhead_s + (compute if compute > self.weights_floor_s else self.weights_floor_s)
                + self.attn_pair_s * prefill_attn_pairs + self.kv_token_s * decode_context_tokens
                + self.per_seq_s * num_seqs)

    def decode_step_coeffs(self, num_decodes: int, context_tokens: int) -> tuple[float, float]:
        """``(a, b)`` with the i-th of consecutive pure-decode iterations of the same ``num_decodes`` sequences
        taking ``a + b*i`` seconds (each decode's context grows by one token per iteration); i = 0 is the next one,
        whose summed context is ``context_tokens``."""
        first = self.iteration_time(0, num_decodes, context_tokens)
        return first, self.kv_token_s * num_decodes

    @staticmethod
    def chunk_pairs(chunk_tokens: int, start: int) -> float:
        """Causal attention pairs of a prefill chunk of ``chunk_tokens`` starting at position ``start``."""
        return chunk_tokens * start + chunk_tokens * (chunk_tokens + 1) / 2

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    def kv_capacity_tokens(self, memory_utilization: float = 0.9) -> int:
        """Tokens of KV that fit next to the weights in ``memory_utilization`` of the GPU memory."""
        if not 0 < memory_utilization <= 1:
            raise ValueError("memory_utilization must be in (0, 1]")
        free = self.gpu_memory_bytes * memory_utilization - self.model.weight_bytes
        if free <= 0:
            raise ValueError(f"the {self.model.name} weights do not fit in {memory_utilization:.0%} of "
                             f"{self.gpu_memory_bytes / 1e9:.0f} GB")
        return int(free // self.kv_bytes_per_token)

    def prefill_throughput_tps(self, chunk_tokens: int = 2048, prompt_tokens: int = 2048) -> float:
        """Prefill tokens/s of one worker running full iterations of ``chunk_tokens`` (prompts packed back to back)
        over prompts of ``prompt_tokens``: each token attends to half its prompt on average."""
        chunk = max(1, chunk_tokens)
        pairs = chunk * (max(1, prompt_tokens) + 1) / 2
        return chunk / self.iteration_time(chunk, 0, 0, pairs, 1)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        params = {name: getattr(self, name) for name in
                  ("overhead_s", "weights_floor_s", "per_token_s", "attn_pair_s", "kv_token_s", "per_seq_s",
                   "tile_quantum")}
        return {"format": FORMAT, "device": self.device, "model": asdict(self.model), "dtype": self.model.dtype,
                "gpu_memory_bytes": self.gpu_memory_bytes, "date": self.date, "source": self.source,
                "params": params, "held_out_error": dict(self.fit_error)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a cost model file (format {data.get('format')!r}, expected {FORMAT!r})")
        try:
            model = ModelShape(**data["model"])
            params = dict(data["params"])
            params["tile_quantum"] = int(params.get("tile_quantum", 1))
            return cls(**params, device=data.get("device", "unknown"), model=model,
                       gpu_memory_bytes=float(data.get("gpu_memory_bytes", 80e9)), source=data.get("source", ""),
                       date=data.get("date", ""), fit_error=dict(data.get("held_out_error", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed cost model: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, samples: Sequence[dict[str, Any]], tile_quantum: int = 1, device: str = "unknown",
            model: ModelShape = MISTRAL_7B, gpu_memory_bytes: float = 80e9, holdout_every: int = 5) -> CostModel:
        """Least-squares fit of measured iterations (format in the module docstring). Coefficients are kept
        non-negative; the weights floor comes from the best ridge point (tokens where compute meets the floor).
        ``fit_error`` holds the held-out absolute percentage errors (mean, p90, max) of a fit without every
        ``holdout_every``-th sample; the returned model is fitted on all samples."""
        features = _features(samples)
        if len(features) < 6:
            raise ValueError(f"need at least 6 samples to fit, got {len(features)}")
        if holdout_every < 2:
            raise ValueError("holdout_every must be >= 2")
        held = np.zeros(len(features), dtype=bool)
        held[holdout_every - 1::holdout_every] = True
        train = _fit_params(features[~held], tile_quantum)
        probe = cls(**train, tile_quantum=tile_quantum, model=model)
        errors = np.array([abs(probe._predict(row) - row[-1]) / row[-1] for row in features[held]])
        params = _fit_params(features, tile_quantum)
        fit_error = {"mean_ape": float(errors.mean()), "p90_ape": float(np.percentile(errors, 90)),
                     "max_ape": float(errors.max()), "held_out": int(held.sum()), "samples": len(features)}
        return cls(**params, tile_quantum=tile_quantum, device=device, model=model, gpu_memory_bytes=gpu_memory_bytes,
                   source="fit", date=_dt.date.today().isoformat(), fit_error=fit_error)

    def _predict(self, row: np.ndarray) -> float:
        prefill, decodes, context, pairs, seqs, _ = row
        return self.iteration_time(int(prefill), int(decodes), float(context), float(pairs), int(seqs))


def _features(samples: Iterable[dict[str, Any]]) -> np.ndarray:
    """Rows of (prefill_tokens, num_decodes, decode_context_tokens, attn_pairs, num_seqs, seconds)."""
    rows = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"sample {i}: expected a dict, got {type(sample).__name__}")
        try:
            seconds = float(sample["seconds"])
            chunks = sample.get("prefill_chunks")
            if chunks is not None:
                chunks = [(int(c), int(s)) for c, s in chunks]
            prefill = int(sample.get("prefill_tokens", sum(c for c, _ in chunks) if chunks else 0))
            decodes = int(sample.get("num_decodes", 0))
            context = float(sample.get("decode_context_tokens", 0))
            if "prefill_attn_pairs" in sample:
                pairs = float(sample["prefill_attn_pairs"])
            elif chunks:
                pairs = sum(CostModel.chunk_pairs(c, s) for c, s in chunks)
            else:
                pairs = prefill * (prefill + 1) / 2
            seqs = int(sample.get("num_seqs", decodes + (len(chunks) if chunks else (1 if prefill else 0))))
        except KeyError as exc:
            raise ValueError(f"sample {i}: missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample {i}: {exc}") from None
        if seconds <= 0 or prefill < 0 or decodes < 0 or context < 0 or prefill + decodes == 0:
            raise ValueError(f"sample {i}: needs seconds > 0 and some prefill tokens or decodes, got {sample}")
        rows.append((prefill, decodes, context, pairs, seqs, seconds))
    return np.array(rows, dtype=float).reshape(-1, 6)


def _fit_params(rows: np.ndarray, tile_quantum: int) -> dict[str, Any]:
    tokens = rows[:, 0] + rows[:, 1]
    quantized = np.ceil(tokens / tile_quantum) * tile_quantum
    seconds = rows[:, 5]
    best: tuple[float, dict[str, float]] | None = None
    ridges = np.unique(np.concatenate([[0.0], quantized, np.geomspace(1, max(2.0, quantized.max()), 48)]))
    for ridge in ridges:
        design = np.column_stack([np.ones(len(rows)), np.maximum(quantized, ridge), rows[:, 3], rows[:, 2], rows[:, 4]])
        coef = _nnls(design, seconds)
        residual = float(np.sum(((design @ coef - seconds) / seconds) ** 2))  # relative error, all sizes alike
        if best is None or residual < best[0] - 1e-15:
            best = (residual, {"overhead_s": coef[0], "per_token_s": coef[1], "weights_floor_s": coef[1] * ridge,
                               "attn_pair_s": coef[2], "kv_token_s": coef[3], "per_seq_s": coef[4]})
    assert best is not None
    return {name: float(value) for name, value in best[1].items()}


def _nnls(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares, relative-error weighted, by dropping the most negative coefficient until none is
    left (enough for five well-scaled columns)."""
    weights = 1.0 / target
    a, b = design * weights[:, None], target * weights
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    active = [j for j in range(design.shape[1]) if np.any(design[:, j])]
    coef = np.zeros(design.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(a[:, active] / scale[active], b, rcond=None)
        solution = solution / scale[active]
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coef


def _preset(device: str, bandwidth_Bps: float, flops: float, memory_bytes: float, model: ModelShape,
            overhead_s: float = 3e-4, tile_quantum: int = 64, weights_floor_s: float | None = None) -> CostModel:
    return CostModel(
        overhead_s=overhead_s,
        weights_floor_s=weights_floor_s if weights_floor_s is not None else model.weight_bytes / (bandwidth_Bps / 0.75),
        per_token_s=2 * model.num_params / flops,
        attn_pair_s=model.attn_flops_per_pair / flops,
        kv_token_s=model.kv_bytes_per_token / bandwidth_Bps,
        tile_quantum=tile_quantum, device=device, model=model, gpu_memory_bytes=memory_bytes, source="derived",
        date="2026-11-21",
    )


H200_BW, H200_FLOPS = 3.2e12, 550e12  # effective: 75% of the measured copy rate, ~69% of measured matmul
_H200_SHEET_BW, _H200_SHEET_FLOPS = 4.8e12, 989e12

PRESETS: dict[str, CostModel] = {
    # measured-figure default (workloads.md): weights floor 3.4 ms as measured, KV at 3.2 TB/s, 550 TFLOP/s
    "h200-mistral-7b": _preset("NVIDIA H200", H200_BW, H200_FLOPS, 141e9, MISTRAL_7B, weights_floor_s=3.4e-3),
    # datasheet ratios to the H200: H100 SXM 3.35 TB/s, 989 TFLOP/s, 80 GB
    "h100-mistral-7b": _preset("NVIDIA H100 SXM", H200_BW * 3.35 / 4.8, H200_FLOPS, 80e9, MISTRAL_7B),
    # the SLAI paper's GPU: RTX 6000 Ada 960 GB/s, 364 TFLOP/s dense bf16, 48 GB
    "rtx6000ada-mistral-7b": _preset("NVIDIA RTX 6000 Ada", H200_BW * 0.96 / 4.8, H200_FLOPS * 364 / 989, 48e9,
                                     MISTRAL_7B),
    # the VTC paper's GPU: A10G 600 GB/s, ~70 TFLOP/s dense bf16, 24 GB, with Llama-2-7B (MHA: 512 KiB/token)
    "a10g-llama-2-7b": _preset("NVIDIA A10G", H200_BW * 0.6 / 4.8, H200_FLOPS * 70 / 989, 24e9, LLAMA2_7B),
}
DEFAULT = PRESETS["h200-mistral-7b"]


def resolve(name_or_path: str | None) -> CostModel:
    """A preset name, a JSON file saved by ``CostModel.save``, or None for ``DEFAULT``."""
    if name_or_path is None:
        return DEFAULT
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"unknown cost model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a file")
    return CostModel.load(path)


__all__ = ["CostModel", "ModelShape", "MISTRAL_7B", "LLAMA2_7B", "PRESETS", "DEFAULT", "resolve", "replace"]
