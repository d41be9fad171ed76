"""``diptych profile``: measured iteration times of the engine's model runner for the simulator's cost model.

Each sample is one packed iteration: ``prefill_tokens`` of one prompt chunk starting at position 0, plus
``num_decodes`` decodes at ``context`` tokens each, run through ``ModelRunner.execute`` (CUDA graphs for decode-only
iterations, as in serving) plus the greedy sample's read-back: the engine's per-iteration device time with its
host-side input preparation, without the batch policy. KV contents are whatever the pool holds (timing does not
depend on values).

Outputs (``--out-dir``): ``iteration_times_<device>.json`` (environment, the grid samples in
``sim.cost_model.CostModel.fit``'s format, off-grid held-out samples, the tile sweep) and ``cost_model_<device>.json``
(the fitted ``CostModel``, with its held-out error and the tile quantum).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diptych.benchmarks.common import build_model, environment, median, sync, table
from diptych.cluster.blocks import blocks_for
from diptych.engine.model_runner import ForwardItem

GRID_PREFILL = (0, 128, 512, 1024, 2048)
GRID_DECODES = (0, 8, 32, 64, 128)
GRID_CONTEXT = (256, 1024, 2048)


class IterationTimer:
    """Times packed iterations on an engine's runner with block tables carved out of its pool."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.block_size = engine.block_size
        self.num_blocks = engine.num_blocks

    def _table(self, first: int, positions: int) -> list[int]:
        count = blocks_for(positions, self.block_size)
        if first + count > self.num_blocks:
            raise ValueError(f"the KV pool of {self.num_blocks} blocks is too small for this grid point")
        return list(range(first, first + count))

    def items(self, prefill: int, decodes: int, context: int) -> list[ForwardItem]:
        items, next_block = [], 0
        if prefill:
            table = self._table(0, prefill)
            items.append(ForwardItem([5] * prefill, 0, table, needs_logits=True))
            next_block = len(table)
        for _ in range(decodes):
            table = self._table(next_block, context + 1)
            items.append(ForwardItem([7], context, table, needs_logits=True))
            next_block += len(table)
        return items

    def seconds(self, prefill: int, decodes: int, context: int, repeats: int = 5) -> float:
        items = self.items(prefill, decodes, context)
        device = self.runner.device

        def once() -> None:
            logits = self.runner.execute(items)
            logits.argmax(dim=-1).tolist()

        once()
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        return median(times)


def sample(prefill: int, decodes: int, context: int, seconds: float) -> dict:
    out: dict[str, Any] = {"prefill_tokens": prefill, "num_decodes": decodes,
                           "decode_context_tokens": decodes * (context + 1), "seconds": seconds, "context": context}
    if prefill:
        out["prefill_chunks"] = [[prefill, 0]]
    return out


def tile_steps(tokens: list[int], seconds: list[float]) -> tuple[list[int], int]:
    """Token counts where time jumps (a step more than 3x the median increment and > 2% of the time) and the
    quantum: the most common spacing between such steps (0 if fewer than two)."""
    diffs = np.diff(seconds)
    typical = float(np.median(np.abs(diffs))) if len(diffs) else 0.0
    steps = [tokens[i + 1] for i, d in enumerate(diffs) if d > 3 * typical and d > 0.02 * seconds[i]]
    spacings = np.diff(steps)
    if len(spacings) == 0:
        return steps, 0
    values, counts = np.unique(spacings, return_counts=True)
    return steps, int(values[np.argmax(counts)])


def run(args) -> dict:
    from diptych.benchmarks.engine_bench import make_engine

    device = args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    env = environment(device)
    mut = build_model(args.model, device, dtype)
    grid_p, grid_b, grid_c = args.prefill, args.decodes, args.context
    max_len = max(max(grid_p), max(grid_c) + 8)
    engine = make_engine(mut, device, max(max(grid_b), 1), args.kv_gb, max_len, max(max(grid_p), 1))
    timer = IterationTimer(engine)
    env.update(model=args.model, kv_bytes_per_token=mut.kv_bytes_per_token)
    grid = [(p, b, c) for p in grid_p for b in grid_b for c in (grid_c if b else grid_c[:1]) if p or b]
    rng = random.Random(0)
    held = [(rng.choice([0, rng.randrange(1, max(grid_p) + 1)]), rng.randrange(1, max(grid_b) + 1),
             rng.randrange(16, max(grid_c) + 1)) for _ in range(args.held_out)]
    samples = [sample(p, b, c, timer.seconds(p, b, c)) for p, b, c in grid]
    held_samples = [sample(p, b, c, timer.seconds(p, b, c)) for p, b, c in held]
    sweep_tokens = list(range(args.sweep_step, args.sweep_max + 1, args.sweep_step))
    sweep = [timer.seconds(t, 0, 0) for t in sweep_tokens]
    steps, quantum = tile_steps(sweep_tokens, sweep)
    data: dict[str, Any] = {"environment": env, "samples": samples, "held_out_samples": held_samples,
            "tile_sweep": {"tokens": sweep_tokens, "seconds": sweep, "steps_at": steps, "tile_quantum": quantum}}
    data["fit"] = fit(samples, held_samples, quantum, env)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"iteration_times_{slug}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    if data["fit"].get("model") is not None:
        (out_dir / f"cost_model_{slug}.json").write_text(json.dumps(data["fit"]["model"], indent=2) + "\n")
    print(format_report(data))
    return data


def fit(samples: list[dict], held_out: list[dict], quantum: int, env: dict) -> dict:
    """Fit ``sim.cost_model.CostModel`` on the grid; report its error on the off-grid held-out samples."""
    try:
        from diptych.sim.cost_model import CostModel
    except ImportError as exc:
        return {"error": f"sim.cost_model unavailable: {exc}"}
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    model = CostModel.fit(samples, tile_quantum=max(1, quantum), device=env["device"], gpu_memory_bytes=float(memory))
    errors = [abs(model.iteration_time(s["prefill_tokens"], s["num_decodes"], s["decode_context_tokens"])
                  - s["seconds"]) / s["seconds"] for s in held_out]
    return {"model": model.to_dict(), "held_out_median_ape": float(np.median(errors)) if errors else None,
            "held_out_p90_ape": float(np.percentile(errors, 90)) if errors else None, "held_out_count": len(errors)}


def format_report(data: dict) -> str:
    env = data["environment"]
    lines = [f"device {env['device']}, model {env['model']}, commit {env['commit']}, {env['date']}", ""]
    rows = [[s["prefill_tokens"], s["num_decodes"], s["context"], s["seconds"] * 1e3] for s in data["samples"]]
    lines.append(table(["prefill tokens", "decodes", "context each", "ms"], rows))
    sweep = data["tile_sweep"]
    lines += ["", f"tile sweep (prefill only, step {sweep['tokens'][0]}): time steps up at {sweep['steps_at']}; "
                  f"tile quantum {sweep['tile_quantum']} tokens"]
    f = data["fit"]
    if "model" in f:
        params = f["model"]["params"]
        lines += ["", "fitted cost model: " + ", ".join(f"{k}={v:.4g}" for k, v in params.items()),
                  f"held-out error: sim's every-5th-sample split {f['model']['held_out_error']}; off-grid random "
                  f"points: median {f['held_out_median_ape']:.1%}, p90 {f['held_out_p90_ape']:.1%} "
                  f"({f['held_out_count']} points)"]
    else:
        lines += ["", f"no fit: {f.get('error')}"]
    return "\n".join(lines)
