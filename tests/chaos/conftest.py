"""Fixtures of the chaos tests: the tiny model of the integration tests."""

from tests.integration.conftest import tiny_llama  # noqa: F401
