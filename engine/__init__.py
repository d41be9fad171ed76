"""Diptych's model-execution engine: Hugging Face decoder models on a paged, block-major KV pool.

``Engine`` is what a worker (prefill, decode or colocated) drives: ``add_request`` / ``reserve`` +
``add_prefilled``, then ``step`` until ``has_work`` is False; ``export_kv`` hands a prefilled request's KV to
another engine. ``build_tiny_model`` / ``default_model_path`` make small random-weight models for tests and demos.
"""

from diptych.engine.config import EngineConfig
from diptych.engine.engine import Engine
from diptych.engine.outputs import SampledToken, StepOutput
from diptych.engine.tiny_model import build_tiny_model, default_model_path, resolve_model

__all__ = [
    "Engine", "EngineConfig", "SampledToken", "StepOutput", "build_tiny_model", "default_model_path", "resolve_model",
]
