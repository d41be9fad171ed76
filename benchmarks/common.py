"""Shared pieces of the benchmarks: the model under test, timing, the measured hardware ceilings and tables.

Models: ``mistral-7b-shape`` builds Mistral-7B's public shape (32 layers, hidden 4096, 32 heads, 8 KV heads,
intermediate 14336, vocab 32000) with random bf16 weights directly on the device (nothing is downloaded);
``tiny`` is the built-in tiny random Llama (for CPU runs and tests); anything else is a hub id or a local directory.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MISTRAL_7B_SHAPE: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


@dataclass
class ModelUnderTest:
    """A built model plus what the benchmarks report about it."""

    model: PreTrainedModel
    name: str
    tokenizer_path: str | None
    """Where an ``Engine`` takes its tokenizer (``EngineConfig.model``); None = the built-in tiny one."""

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def streamed_weight_bytes(self) -> int:
        """Bytes of weights one forward pass reads: every parameter but the input embedding (only the rows of the
        batch's tokens are read)."""
        embed = self.model.get_input_embeddings().weight
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p is not embed)

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * self.model.dtype.itemsize


def build_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> ModelUnderTest:
    """The model under test on ``device``, loaded with Diptych's paged attention."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from diptych.engine.attention import ATTENTION_NAME
    from diptych.engine.tiny_model import resolve_model

    torch.manual_seed(seed)
    if name == "mistral-7b-shape":
        config = MistralConfig(**MISTRAL_7B_SHAPE)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
        return ModelUnderTest(model.eval(), name, None)
    path = resolve_model(None if name == "tiny" else name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION_NAME)
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which hides its bound signature
    return ModelUnderTest(model.to(device).eval(), name, path)  # type: ignore[arg-type]


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: bos (1), then random ids in ``[3, vocab)``."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(count)]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (device synchronised around each), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written (the floor's bandwidth)."""
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return 2 * nbytes / median(times)


def matmul_rate(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matrix product rate in FLOP/s on random data."""
    if torch.device(device).type != "cuda":
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_call(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * n**3 / median(times)


def environment(device: str) -> dict:
    """Device name, software versions and the commit, for the report header."""
    import transformers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    commit = os.environ.get("DIPTYCH_COMMIT", "")  # set it for a tree copied without its own .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit or "unknown", "date": time.strftime("%Y-%m-%d")}


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 3 significant decimals."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")
