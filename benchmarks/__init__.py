"""Benchmarks and profiling of Diptych's engine and KV handoff (``diptych bench``, ``diptych profile``).

Every benchmark prints Markdown tables of ours vs HF transformers (same model, same process) vs the hardware floor,
and can write its raw numbers as JSON. On a CPU they run with the built-in tiny model, for tests.
"""
