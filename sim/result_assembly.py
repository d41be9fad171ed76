"""Turning a finished simulation into a ``metrics.RunResult``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from diptych.metrics.results import STATUS_CODES, RunResult

if TYPE_CHECKING:
    from diptych.sim.simulator import Simulator

NAN = float("nan")


def assemble_result(sim: Simulator, end: float) -> RunResult:
    """The result of ``sim`` stopped at ``end`` (seconds): tokens of stretches in flight count up to ``end``."""
    tokens = sim.tokens
    tokens.flush_gaps()
    specs = sim.specs
    num_tokens = sim.num_tokens
    for i in range(len(specs)):
        if sim.status[i] == STATUS_CODES["unfinished"]:
            seq = sim.req_seq[i]
            if seq is not None:
                extra = 0
                worker = sim.workers[sim.req_decode[i]] if sim.req_decode[i] >= 0 else None
                if worker is not None and worker.busy and worker.stretch and seq in worker.stretch_seqs:
                    extra = worker.completed_iterations(end)
                num_tokens[i] = seq.num_output + extra
    times = {"arrival": np.array([s.arrival_time for s in specs], float)}
    times.update({phase: np.array(values, float) for phase, values in sim.times.items()})
    names = {w.index: w.worker_id for w in sim.workers}
    return RunResult(
        request_ids=[s.request_id for s in specs], client_ids=[s.client_id for s in specs],
        tiers=[s.tier for s in specs],
        prompt_len=np.array([s.prompt_len for s in specs], np.int64),
        output_len=np.array([s.output_len for s in specs], np.int64),
        weight=np.array([s.weight for s in specs], float),
        tbt_slo=np.array([NAN if s.tbt_slo_s is None else s.tbt_slo_s for s in specs], float),
        ttft_slo=np.array([NAN if s.ttft_slo_s is None else s.ttft_slo_s for s in specs], float),
        times=times, status=np.array(sim.status, np.int8), num_tokens=np.array(num_tokens, np.int64),
        num_gaps=np.array(tokens.num_gaps, np.int64), max_tbt=np.array(tokens.max_tbt, float),
        tbt_violations=np.array(tokens.violations, np.int64),
        tbt_hist={name: tokens.hists[k] for k, name in enumerate(sim.tier_names)}, end_time=end,
        token_times=[np.array(t) for t in tokens.token_times] if tokens.token_times is not None else None,
        prefill_worker=[names.get(k) if k >= 0 else None for k in sim.req_prefill],
        decode_worker=[names.get(k) if k >= 0 and not sim.colocated else None for k in sim.req_decode],
        kv_bytes_per_token=sim.cost.kv_bytes_per_token,
        meta={"cluster": sim.config.describe(), "events": sim.events, "pool_history": sim.pool_moves.history,
              "pool_moves": sim.pool_moves.moves, **kv_figures(sim)},
    )


def kv_figures(sim: Simulator) -> dict[str, Any]:
    """KV-on-demand figures of the run: ``preemptions`` and ``recomputed_tokens`` (computed positions the
    preemptions dropped) over all workers, ``peak_running`` (the most sequences running at once on one worker),
    ``kv_workers`` the three per worker (by final worker id), and ``request_preemptions`` per request."""
    workers = {w.worker_id: {"preemptions": w.preemptions, "recomputed_tokens": w.recomputed_tokens,
                             "peak_running": w.peak_running} for w in sim.workers}
    return {"preemptions": sum(w.preemptions for w in sim.workers),
            "recomputed_tokens": sum(w.recomputed_tokens for w in sim.workers),
            "peak_running": max((w.peak_running for w in sim.workers), default=0),
            "kv_workers": workers, "request_preemptions": list(sim.req_preemptions)}
