"""Tiny random-weight models shared by the engine tests (built once per session, never downloaded)."""

from __future__ import annotations

import random

import pytest

from diptych.engine import Engine, EngineConfig, build_tiny_model
from diptych.policies.batch import SarathiBatching


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", family="qwen2")


@pytest.fixture
def make_engine():
    """``make_engine(model, token_budget=32, num_blocks=128, block_size=8, **config)``: an engine with a small
    pool and a small token budget, so prefill chunks and decodes share iterations."""

    def make(model: str, token_budget: int = 32, num_blocks: int = 128, block_size: int = 8, **config) -> Engine:
        return Engine(
            EngineConfig(model=model, num_blocks=num_blocks, block_size=block_size, **config),
            SarathiBatching(token_budget=token_budget),
        )

    return make


@pytest.fixture
def random_prompts():
    """``random_prompts(lengths, seed=0)``: prompts of ``lengths`` tokens, bos then random byte tokens."""

    def make(lengths: list[int], seed: int = 0) -> list[list[int]]:
        rng = random.Random(seed)
        return [[1] + [rng.randrange(3, 259) for _ in range(n - 1)] for n in lengths]

    return make
