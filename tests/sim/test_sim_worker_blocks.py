"""The simulated worker's block accounting (the engine's count-only allocator) returns every block, preemptions
included."""

from __future__ import annotations

import pytest

from diptych.sim.roles import PREFILL
from diptych.sim.simulator import Simulator
from tests.sim.helpers import colocated, disaggregated, specs


@pytest.mark.parametrize("cluster", [disaggregated(prefill=1, decode=2), colocated(workers=2),
                                     colocated(workers=1, exact=True)],
                         ids=["disaggregated", "colocated", "colocated-exact"])
def test_every_block_is_free_after_the_run(cluster) -> None:
    simulator = Simulator(cluster, specs(n=80, qps=20.0, name="uniform:50-600:10-120", tiers="none", seed=5))
    result = simulator.run()
    assert result.finished.all()
    for worker in simulator.workers:
        assert worker.blocks.num_free == worker.total_blocks
        assert not worker.has_work()


@pytest.mark.parametrize("cluster", [disaggregated(prefill=1, decode=2, kv_blocks=100),
                                     colocated(workers=2, kv_blocks=100, colocated_reserve=False,
                                               max_prefill_backlog_tokens=None)],
                         ids=["disaggregated", "colocated"])
def test_every_block_is_free_after_a_run_that_preempts(cluster) -> None:
    # 1600 tokens per pool, requests of up to 1200: sequences grow into each other (past placement's expected
    # footprint on the decode workers) and are preempted, there too
    simulator = Simulator(cluster, specs(n=80, qps=20.0, name="uniform:50-300:300-900", tiers="none", seed=5))
    result = simulator.run()
    assert result.finished.all() and (result.num_tokens == result.output_len).all()
    for worker in simulator.workers:
        if worker.role != PREFILL:
            assert worker.preemptions > 0
        assert worker.blocks.num_free == worker.total_blocks
        assert not worker.has_work() and not worker.pending_reservations
