"""Knob schemas: every registered policy's schema matches its constructor; bad knobs are one-line errors."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from diptych.policies import ADMISSION_POLICIES, BATCH_POLICIES, POOL_POLICIES
from diptych.policies.knobs import Knob, check_knobs
from diptych.policies.registry import Registry

REGISTRIES: list[Registry] = [ADMISSION_POLICIES, BATCH_POLICIES, POOL_POLICIES]
ALL_POLICIES = [(registry, name) for registry in REGISTRIES for name in registry.names()]


@pytest.mark.parametrize(("registry", "name"), ALL_POLICIES, ids=[f"{r.kind}-{n}" for r, n in ALL_POLICIES])
def test_schema_matches_constructor(registry: Registry, name: str):
    params = [p for p in inspect.signature(registry.get(name).__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # object.__init__
    schema = registry.knobs(name)
    assert [k.name for k in schema] == [p.name for p in params]
    for knob, param in zip(schema, params):
        assert knob.default == param.default, knob.name
        assert knob.help, knob.name
        assert knob.check(knob.default) == knob.default  # the default passes its own check
    registry.create(name, **{k.name: k.default for k in schema})  # and builds the policy


def test_unknown_knob_is_one_line_naming_the_valid_ones():
    with pytest.raises(ValueError) as info:
        BATCH_POLICIES.create("sarathi", foo=1)
    message = str(info.value)
    assert "\n" not in message
    assert "'foo'" in message and "token_budget, max_running, max_decodes" in message
    with pytest.raises(ValueError, match="valid knobs: none"):
        ADMISSION_POLICIES.create("fcfs", w_p=1.0)


def test_wrong_type_is_refused_and_int_widens_to_float():
    with pytest.raises(ValueError, match="'token_budget' must be int"):
        BATCH_POLICIES.create("sarathi", token_budget="big")
    with pytest.raises(ValueError, match="must be int"):
        BATCH_POLICIES.create("sarathi", token_budget=True)
    with pytest.raises(ValueError, match="fifo, spf"):
        ADMISSION_POLICIES.create("vtc", client_queue_order="lifo")
    policy = ADMISSION_POLICIES.create("vtc", w_q=3)
    assert isinstance(policy.w_q, float) and policy.w_q == 3.0  # type: ignore[attr-defined]
    assert check_knobs([Knob("aging_s", float, None, "x", optional=True)], {"aging_s": None}, "p") == {"aging_s": None}


def test_unknown_policy_is_still_a_key_error():
    with pytest.raises(KeyError, match="choose one of"):
        BATCH_POLICIES.create("nope")


def _diptych(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diptych", *argv], capture_output=True, text=True, timeout=120)


def test_policies_command_lists_knobs():
    out = _diptych("policies", "slai")
    assert out.returncode == 0, out.stderr
    assert "theta_lo (float, default 5.0)" in out.stdout and "b_bar_mode (cumulative|ewma" in out.stdout
    listing = _diptych("policies")
    assert listing.returncode == 0 and "sarathi" in listing.stdout and "vtc" in listing.stdout


@pytest.mark.parametrize("argv", [
    ["coordinator", "--insecure-no-curve", "--admission", "vtc", "--admission-opt", "foo=1"],
    ["simulate", "--workload", "uniform", "--num-requests", "1", "--prefill-opt", "foo=1"],
    ["serve", "--policy", "sarathi", "--policy-opt", "foo=1"],
])
def test_cli_bad_knob_is_one_line_error(argv):
    out = _diptych(*argv)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "foo" in line]
    assert len(errors) == 1 and "valid knobs:" in errors[0], out.stderr
