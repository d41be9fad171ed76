"""Turning a finished simulation into a ``metrics.RunResult``. A mixin of ``sim.simulator.Simulator``."""

from __future__ import annotations

import numpy as np

from diptych.metrics.results import STATUS_CODES, RunResult

NAN = float("nan")


class ResultAssembly:
    def _result(self, end: float) -> RunResult:
        self.flush_gaps()
        n = len(self.specs)
        specs = self.specs
        for i in range(n):
            if self.status[i] == STATUS_CODES["unfinished"]:
                seq = self.req_seq[i]
                if seq is not None:
                    extra = 0
                    worker = self.workers[self.req_decode[i]] if self.req_decode[i] >= 0 else None
                    if worker is not None and worker.busy and worker.stretch and seq in worker.stretch_seqs:
                        extra = worker.completed_iterations(end)
                    self.num_tokens[i] = seq.num_output + extra
        times = {"arrival": np.array([s.arrival_time for s in specs], float)}
        times.update({phase: np.array(values, float) for phase, values in self.times.items()})
        names = {w.index: w.worker_id for w in self.workers}
        return RunResult(
            request_ids=[s.request_id for s in specs], client_ids=[s.client_id for s in specs],
            tiers=[s.tier for s in specs],
            prompt_len=np.array([s.prompt_len for s in specs], np.int64),
            output_len=np.array([s.output_len for s in specs], np.int64),
            weight=np.array([s.weight for s in specs], float),
            tbt_slo=np.array([NAN if s.tbt_slo_s is None else s.tbt_slo_s for s in specs], float),
            ttft_slo=np.array([NAN if s.ttft_slo_s is None else s.ttft_slo_s for s in specs], float),
            times=times, status=np.array(self.status, np.int8), num_tokens=np.array(self.num_tokens, np.int64),
            num_gaps=np.array(self.num_gaps, np.int64), max_tbt=np.array(self.max_tbt, float),
            tbt_violations=np.array(self.violations, np.int64),
            tbt_hist={name: self.hists[k] for k, name in enumerate(self.tier_names)}, end_time=end,
            token_times=[np.array(t) for t in self.token_times] if self.token_times is not None else None,
            prefill_worker=[names.get(k) if k >= 0 else None for k in self.req_prefill],
            decode_worker=[names.get(k) if k >= 0 and not self.colocated_pool else None for k in self.req_decode],
            kv_bytes_per_token=self.cost.kv_bytes_per_token,
            meta={"cluster": self.config.describe(), "events": self.events, "pool_history": self.pool_history,
                  "pool_moves": self.pool_moves},
        )
