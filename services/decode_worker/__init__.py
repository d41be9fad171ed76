"""Decode worker: reserves KV, receives handoffs, continuous-batching decode, streams tokens."""
