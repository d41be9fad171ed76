"""Diptych's model-execution engine: Hugging Face decoder models on a paged, block-major KV pool.

``Engine`` is what a worker (prefill, decode or colocated) drives: ``add_request`` / ``reserve`` +
``add_prefilled``, then ``step`` until ``has_work`` is False; ``export_kv`` hands a prefilled request's KV to
another engine. ``build_tiny_model`` / ``default_model_path`` make small random-weight models for tests and demos.

The names below load on first use, so the torch-free modules (``engine.scheduler``, ``engine.block_pool``, which the
simulator uses) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diptych.engine.config import EngineConfig
    from diptych.engine.engine import Engine
    from diptych.engine.outputs import SampledToken, StepOutput
    from diptych.engine.tiny_model import build_tiny_model, default_model_path, resolve_model

_HOMES = {
    "Engine": "engine", "EngineConfig": "config", "SampledToken": "outputs", "StepOutput": "outputs",
    "build_tiny_model": "tiny_model", "default_model_path": "tiny_model", "resolve_model": "tiny_model",
}

__all__ = [
    "Engine", "EngineConfig", "SampledToken", "StepOutput", "build_tiny_model", "default_model_path", "resolve_model",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"diptych.engine.{home}"), name)
