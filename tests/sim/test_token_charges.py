"""Every output token is charged to its client's admission counter exactly once, whether the simulator calls the
batch policy before every iteration (``exact``) or fast-forwards stationary decode stretches."""

from __future__ import annotations

import pytest

from diptych.sim.simulator import Simulator
from tests.sim.helpers import PolicySpec, colocated, disaggregated, replace, specs


def output_service(config, workload) -> dict[str, float]:
    """Per-client service the admission policy was charged (``w_p = 0``: output tokens only, ``w_q`` each)."""
    simulator = Simulator(config, workload)
    simulator.run()
    return dict(simulator.admission.service)


@pytest.mark.parametrize("admission", ["vtc", "lcf"])
@pytest.mark.parametrize("cluster", [disaggregated(prefill=1, decode=2), colocated(workers=2)],
                         ids=["disaggregated", "colocated"])
def test_exact_and_fast_forwarded_runs_charge_the_same_output_tokens(admission, cluster) -> None:
    workload = specs(n=150, qps=30.0, name="uniform:50-400:20-200", tiers="none", seed=3, clients=3)
    config = replace(cluster, admission=PolicySpec(admission, {"w_p": 0.0, "w_q": 1.0}))
    fast = output_service(replace(config, exact=False), workload)
    exact = output_service(replace(config, exact=True), workload)
    expected: dict[str, float] = {}
    for spec in workload:
        expected[spec.client_id] = expected.get(spec.client_id, 0.0) + spec.output_len
    assert exact == expected
    assert fast == expected
