"""Worker-role tests reuse the engine tests' tiny models and engine factory."""

from tests.engine.conftest import make_engine, random_prompts, tiny_llama  # noqa: F401 (pytest fixtures)
