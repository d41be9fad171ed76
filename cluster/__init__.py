"""The cluster core: the pure state and rules of a Diptych cluster, with no I/O and no clock of its own.

The coordinator drives it with real messages and the wall clock; the simulator drives it in virtual time. Nothing
here imports torch, ZeroMQ or asyncio.
"""
