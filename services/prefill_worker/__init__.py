"""Prefill worker: chunked prefill, first token, KV pushed into the decode worker's reservation."""
