"""Readers for user trace files: CSV with lengths (and optional timestamps) and Mooncake JSONL.

CSV columns are recognised by name (case-insensitive):

- prompt length: ``prompt_len``, ``prompt_tokens``, ``input_length``, ``input_tokens``, ``num_prefill_tokens``,
  ``ContextTokens``;
- output length: ``output_len``, ``output_tokens``, ``output_length``, ``num_decode_tokens``, ``GeneratedTokens``;
- optional arrival time: ``arrival_time`` / ``timestamp_s`` (seconds), ``timestamp_ms`` (milliseconds), or
  ``timestamp`` / ``TIMESTAMP`` (a number of seconds, or a date-time such as ``2023-11-16 18:17:03.97996``).

Mooncake JSONL: one object per line with ``timestamp`` (ms), ``input_length``, ``output_length`` (``hash_ids``, the
prefix-block hashes, are read and kept but Diptych has no prefix cache yet).

Arrival times are returned relative to the first request (seconds), sorted; rows with a non-positive length are
rejected with the line number.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROMPT_COLUMNS = ("prompt_len", "prompt_tokens", "input_length", "input_tokens", "num_prefill_tokens",
                  "contexttokens")
OUTPUT_COLUMNS = ("output_len", "output_tokens", "output_length", "num_decode_tokens", "generatedtokens")
TIME_COLUMNS = {"arrival_time": 1.0, "timestamp_s": 1.0, "timestamp_ms": 1e-3, "timestamp": None}


@dataclass
class TraceData:
    """Lengths in tokens; ``arrival_times`` in seconds from the first request, or None when the file has none."""

    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrival_times: np.ndarray | None
    hash_ids: list[list[int]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.prompt_lens)


def _pick(header: list[str], names: tuple[str, ...] | dict) -> str | None:
    lower = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lower:
            return lower[name]
    return None


def _parse_time(text: str, scale: float | None) -> float:
    text = text.strip()
    try:
        value = float(text)
        return value * (scale if scale is not None else 1.0)
    except ValueError:
        pass
    try:  # Azure: 7 fractional digits, which datetime does not accept
        head, _, frac = text.partition(".")
        stamp = dt.datetime.fromisoformat(head.replace("T", " "))
        return stamp.replace(tzinfo=dt.timezone.utc).timestamp() + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise ValueError(f"cannot read time {text!r}") from None


def read_csv_trace(path: str | Path) -> TraceData:
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file") from None
        prompt_col, output_col = _pick(header, PROMPT_COLUMNS), _pick(header, OUTPUT_COLUMNS)
        if prompt_col is None or output_col is None:
            raise ValueError(f"{path}: needs a prompt length column (one of {', '.join(PROMPT_COLUMNS)}) and an "
                             f"output length column (one of {', '.join(OUTPUT_COLUMNS)}); header is {header}")
        time_col = _pick(header, tuple(TIME_COLUMNS))
        scale = TIME_COLUMNS[time_col.strip().lower()] if time_col else None
        index = {name: header.index(name) for name in (prompt_col, output_col, time_col) if name}
        prompts, outputs, times = [], [], []
        for line_no, row in enumerate(reader, 2):
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                prompts.append(int(float(row[index[prompt_col]])))
                outputs.append(int(float(row[index[output_col]])))
                if time_col:
                    times.append(_parse_time(row[index[time_col]], scale))
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from None
            if prompts[-1] < 1 or outputs[-1] < 1:
                raise ValueError(f"{path}:{line_no}: lengths must be >= 1, got {prompts[-1]}, {outputs[-1]}")
    if not prompts:
        raise ValueError(f"{path}: no requests")
    return _make(prompts, outputs, times if time_col else None)


def read_mooncake_trace(path: str | Path) -> TraceData:
    path = Path(path)
    prompts, outputs, times, hashes = [], [], [], []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(int(row["input_length"]))
                outputs.append(int(row["output_length"]))
                times.append(float(row["timestamp"]) / 1000.0)
                hashes.append(list(row.get("hash_ids", [])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: bad Mooncake record ({exc!r}); expected timestamp (ms), "
                                 "input_length, output_length") from None
            if prompts[-1] < 1 or outputs[-1] < 1:
                raise ValueError(f"{path}:{line_no}: lengths must be >= 1")
    if not prompts:
        raise ValueError(f"{path}: no requests")
    data = _make(prompts, outputs, times)
    return data if not any(hashes) else TraceData(data.prompt_lens, data.output_lens, data.arrival_times, hashes)


def read_trace(path: str | Path) -> TraceData:
    """By extension: ``.jsonl`` Mooncake, anything else CSV."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"trace file {path} does not exist")
    return read_mooncake_trace(path) if path.suffix.lower() in (".jsonl", ".json") else read_csv_trace(path)


def _make(prompts: list[int], outputs: list[int], times: list[float] | None) -> TraceData:
    p, o = np.array(prompts, dtype=np.int64), np.array(outputs, dtype=np.int64)
    if times is None:
        return TraceData(p, o, None)
    t = np.array(times, dtype=float)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    return TraceData(p[order], o[order], t)
