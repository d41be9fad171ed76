"""The multi-client workloads of the VTC paper (Sheng et al., OSDI 2024, section 5), as request specs.

Requests are 256 prompt / 256 output tokens unless noted; arrivals deterministic (evenly spaced) unless noted.
Rates in requests per minute, as in the paper:

| scenario | clients |
|---|---|
| ``overload`` | 2 clients at 90 and 180 req/min |
| ``proportional`` | 3 clients at 15 / 30 / 90 req/min |
| ``on_off_less`` | client 1: 30 req/min, 60 s on / 60 s off; client 2: 120 req/min |
| ``on_off_overload`` | client 1: on/off at 120 req/min; client 2: 180 req/min |
| ``poisson_short_long`` | Poisson; client 1 480 req/min with 64/64 tokens; client 2 90 req/min with 256/256 |
| ``poisson_short_long_2`` | Poisson; client 1 480 req/min 512 in / 32 out; client 2 90 req/min 32 in / 512 out |
| ``increase`` | client 1 constant 30 req/min; client 2 ramps 12 -> 120 req/min |
| ``dist_shift`` | three equal phases: (client 1 on/off 30, client 2 120); (both 60); (30 and 90) req/min |
| ``weighted`` | 4 clients with weights 1:2:3:4, each at 120 req/min (all overloaded) |

Client ids are ``client1``, ``client2``, ...; request ids ``<client>-<n>``.
"""

from __future__ import annotations

import numpy as np

from diptych.workloads.arrivals import arrivals_in, on_off_times, ramp_times
from diptych.workloads.spec import RequestSpec, sort_and_check

DEFAULT_DURATION_S = {"dist_shift": 900.0}
SCENARIOS = ("overload", "proportional", "on_off_less", "on_off_overload", "poisson_short_long",
             "poisson_short_long_2", "increase", "dist_shift", "weighted")


def _client(name: str, times: np.ndarray, prompt: int = 256, output: int = 256, weight: float = 1.0,
            **slo) -> list[RequestSpec]:
    return [RequestSpec(f"{name}-{i}", float(t), prompt, output, client_id=name, weight=weight, **slo)
            for i, t in enumerate(times)]


def vtc_scenario(name: str, duration_s: float | None = None, seed: int = 0) -> list[RequestSpec]:
    """The requests of scenario ``name`` over ``duration_s`` seconds (default 600; ``dist_shift`` 900)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown VTC scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    duration = DEFAULT_DURATION_S.get(name, 600.0) if duration_s is None else duration_s
    if not duration > 0:
        raise ValueError("duration must be > 0")
    rng = np.random.default_rng(seed)
    per_min = 1 / 60.0

    def const(rate: float, start: float = 0.0, end: float = duration) -> np.ndarray:
        return arrivals_in("constant", rate * per_min, start, end, rng)

    specs: list[RequestSpec] = []
    if name == "overload":
        specs = _client("client1", const(90)) + _client("client2", const(180))
    elif name == "proportional":
        specs = _client("client1", const(15)) + _client("client2", const(30)) + _client("client3", const(90))
    elif name == "on_off_less":
        specs = (_client("client1", on_off_times("constant", 30 * per_min, 60, 60, 0, duration, rng))
                 + _client("client2", const(120)))
    elif name == "on_off_overload":
        specs = (_client("client1", on_off_times("constant", 120 * per_min, 60, 60, 0, duration, rng))
                 + _client("client2", const(180)))
    elif name == "poisson_short_long":
        specs = (_client("client1", arrivals_in("poisson", 480 * per_min, 0, duration, rng), 64, 64)
                 + _client("client2", arrivals_in("poisson", 90 * per_min, 0, duration, rng)))
    elif name == "poisson_short_long_2":
        specs = (_client("client1", arrivals_in("poisson", 480 * per_min, 0, duration, rng), 512, 32)
                 + _client("client2", arrivals_in("poisson", 90 * per_min, 0, duration, rng), 32, 512))
    elif name == "increase":
        specs = (_client("client1", const(30))
                 + _client("client2", ramp_times(12 * per_min, 120 * per_min, 0, duration)))
    elif name == "dist_shift":
        a, b = duration / 3, 2 * duration / 3
        c1 = np.concatenate([on_off_times("constant", 30 * per_min, 60, 60, 0, a, rng), const(60, a, b),
                             const(30, b, duration)])
        c2 = np.concatenate([const(120, 0, a), const(60, a, b), const(90, b, duration)])
        specs = _client("client1", c1) + _client("client2", c2)
    elif name == "weighted":
        for i, weight in enumerate((1.0, 2.0, 3.0, 4.0), 1):
            specs += _client(f"client{i}", const(120), weight=weight)
    return sort_and_check(specs)
