"""The simulated worker's block accounting (the engine's count-only allocator) returns every block."""

from __future__ import annotations

import pytest

from diptych.sim.simulator import Simulator
from tests.sim.helpers import colocated, disaggregated, specs


@pytest.mark.parametrize("cluster", [disaggregated(prefill=1, decode=2), colocated(workers=2),
                                     colocated(workers=1, exact=True)],
                         ids=["disaggregated", "colocated", "colocated-exact"])
def test_every_block_is_free_after_the_run(cluster) -> None:
    simulator = Simulator(cluster, specs(n=80, qps=20.0, name="uniform:50-600:10-120", tiers="none", seed=5))
    result = simulator.run()
    assert result is not None
    for worker in simulator.workers:
        assert worker.blocks.num_free == worker.total_blocks
        assert not worker.has_work()
