"""SLO tiers and per-request SLOs: the tiers configuration (keys file or --slo-tiers), the SLO each request is
submitted with (HTTP ``diptych`` extension, SDK keywords), and the 400s for bad values, over a real frontend."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import httpx
import pytest

from diptych import proto
from diptych.client import AsyncClient
from diptych.errors import BadRequestError
from diptych.services.frontend.identity import ANONYMOUS, load_access
from diptych.services.frontend.slo import BUILTIN_TIERS, Tier
from tests.frontend.conftest import REPO, replying

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


# ------------------------------------------------------------ configuration


def test_builtin_tiers_without_files():
    directory, policy = load_access(None)
    assert policy.tiers == BUILTIN_TIERS and not policy.client_tiers_fixed
    assert directory.authenticate(None) is ANONYMOUS
    assert {"default": Tier(0.2), "strict": Tier(0.1), "relaxed": Tier(0.5)} == BUILTIN_TIERS


def test_tiers_from_the_keys_file_replace_the_builtins_but_keep_default(tmp_path):
    keys = write(tmp_path, "keys.json", {"tiers": {"gold": {"tbt_s": 0.05, "ttft_s": 0.5}},
                                         "clients": {"sk-a": {"client_id": "a", "tier": "gold"}}})
    directory, policy = load_access(keys)
    assert policy.tiers == {"default": Tier(0.2), "gold": Tier(0.05, 0.5)} and policy.client_tiers_fixed
    assert directory.authenticate("sk-a").tier == "gold"


def test_tiers_from_their_own_file(tmp_path):
    tiers = write(tmp_path, "tiers.json", {"default": {"tbt_s": 0.3}, "strict": {"tbt_s": 0.1, "ttft_s": None}})
    _, policy = load_access(None, tiers)
    assert policy.tiers == {"default": Tier(0.3), "strict": Tier(0.1)}
    keys = write(tmp_path, "keys.json", {"clients": {"sk-a": {"client_id": "a", "tier": "strict"}}})
    directory, policy = load_access(keys, tiers)
    assert directory.authenticate("sk-a").tier == "strict" and policy.tiers["default"] == Tier(0.3)


@pytest.mark.parametrize("keys,tiers,message", [
    ({"clients": {"sk-a": {"client_id": "a", "tier": "gold"}}}, None, "unknown tier 'gold'"),
    ({"tiers": {"gold": {"tbt_s": 0.1}}, "clients": {"sk-a": {"client_id": "a", "tier": "strict"}}}, None,
     "unknown tier 'strict'"),
    ({"tiers": {}, "clients": {}}, {"strict": {"tbt_s": 0.1}}, "tiers given twice"),
    ({"tiers": {"gold": {"ttft_s": 1.0}}, "clients": {}}, None, "needs tbt_s"),
    ({"tiers": {"gold": {"tbt_s": 0}}, "clients": {}}, None, "needs tbt_s"),
    ({"tiers": {"gold": {"tbt_s": True}}, "clients": {}}, None, "needs tbt_s"),
    ({"tiers": {"gold": {"tbt_s": 0.1, "ttft_s": -1}}, "clients": {}}, None, "ttft_s must be"),
    ({"tiers": {"gold": {"tbt_s": 0.1, "tbt": 1}}, "clients": {}}, None, "unknown keys ['tbt']"),
    ({"tiers": {"gold": 0.1}, "clients": {}}, None, "must be an object"),
    ({"tiers": ["gold"], "clients": {}}, None, "tiers must be an object"),
    ({"teirs": {}, "clients": {}}, None, "expected"),
    ({"tiers": {}}, None, "expected"),
    (None, ["strict"], "tiers must be an object"),
])
def test_bad_configuration_is_a_clear_error(tmp_path, keys, tiers, message):
    keys_file = write(tmp_path, "keys.json", keys) if keys is not None else None
    tiers_file = write(tmp_path, "tiers.json", tiers) if tiers is not None else None
    with pytest.raises(ValueError) as info:
        load_access(keys_file, tiers_file)
    assert message in str(info.value)


def test_frontend_refuses_to_start_with_a_bad_tier_configuration(tmp_path):
    cases = {
        "unknown_client_tier": ["--api-keys-file", write(tmp_path, "k.json", {"clients": {"sk-a": {
            "client_id": "a", "tier": "gold"}}})],
        "bad_tiers_file": ["--slo-tiers", write(tmp_path, "t.json", {"gold": {"tbt_s": -1}})],
        "unreadable_tiers_file": ["--slo-tiers", write(tmp_path, "u.json", "{not json")],
    }
    cmd = [sys.executable, "-m", "diptych.services.frontend", "--model", "/nonexistent"]
    procs = {name: subprocess.Popen([*cmd, *args],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in cases.items()}
    outputs = {name: proc.communicate(timeout=60)[0] for name, proc in procs.items()}
    assert all(proc.returncode == 1 for proc in procs.values()), outputs
    assert "cannot start" in outputs["unknown_client_tier"] and "unknown tier 'gold'" in outputs[
        "unknown_client_tier"]
    assert "tier 'gold' needs tbt_s" in outputs["bad_tiers_file"]
    assert "cannot read SLO tiers file" in outputs["unreadable_tiers_file"]


# ------------------------------------------------------------ HTTP


@pytest.mark.parametrize("diptych,slo", [
    (None, proto.SLO(tier="default", ttft_s=None, tbt_s=0.2)),
    ({}, proto.SLO(tier="default", ttft_s=None, tbt_s=0.2)),
    ({"tier": "strict"}, proto.SLO(tier="strict", ttft_s=None, tbt_s=0.1)),
    ({"tier": "relaxed", "ttft_s": 2, "tbt_s": 0.3}, proto.SLO(tier="relaxed", ttft_s=2.0, tbt_s=0.3)),
    ({"tbt_s": 0.05, "timeline": False}, proto.SLO(tier="default", ttft_s=None, tbt_s=0.05)),
])
def test_http_slo_without_keys_is_the_requested_one(anon, tokenizer, diptych, slo):
    anon.cluster.responder = replying(tokenizer, "ok")
    extension = {} if diptych is None else {"diptych": diptych}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body in [("/v1/completions", BODY), ("/v1/chat/completions", chat)]:
        resp = httpx.post(anon.http_url + path, json=body | extension, timeout=10)
        assert resp.status_code == 200, resp.text
        assert anon.cluster.wait_submit().slo == slo


BAD_DIPTYCH = [
    ({"tier": "gold"}, "unknown tier 'gold'"),
    ({"tier": ""}, "unknown tier"),
    ({"tier": 5}, "diptych.tier"),
    ({"tbt_s": 0}, "tbt_s must be a positive"),
    ({"tbt_s": -0.1}, "tbt_s must be a positive"),
    ({"ttft_s": 0.0}, "ttft_s must be a positive"),
    ({"tbt_s": "fast"}, "diptych.tbt_s"),
    ({"tbt_s": True}, "diptych.tbt_s"),
    ({"ttft_s": [1]}, "diptych.ttft_s"),
    ({"timeline": "yes"}, "diptych.timeline"),
    ({"timeline": 1}, "diptych.timeline"),
    ({"deadline_s": 1}, "unknown field 'diptych.deadline_s'"),
    ("strict", "diptych"),
    ([{"tier": "strict"}], "diptych"),
]


@pytest.mark.parametrize("diptych,message", BAD_DIPTYCH)
def test_http_bad_diptych_extension_is_400(anon, diptych, message):
    for stream in (False, True):
        resp = httpx.post(anon.http_url + "/v1/completions", json=BODY | {"diptych": diptych, "stream": stream},
                          timeout=10)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "diptych"
        assert message in error["message"], error
    assert not anon.cluster.received(proto.SubmitRequest)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e999"])
def test_http_non_finite_target_is_400(anon, value):
    raw = '{"model": "tiny", "prompt": "hi", "diptych": {"tbt_s": ' + value + "}}"
    resp = httpx.post(anon.http_url + "/v1/completions", content=raw, timeout=10,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "diptych", resp.text
    assert not anon.cluster.received(proto.SubmitRequest)


@pytest.mark.parametrize("key,diptych,slo", [
    # the keys file's strict tier has a TTFT target
    ("sk-alice", None, proto.SLO(tier="strict", ttft_s=1.0, tbt_s=0.1)),
    # cannot change tier, not even down
    ("sk-alice", {"tier": "relaxed"}, proto.SLO(tier="strict", ttft_s=1.0, tbt_s=0.1)),
    # looser: ok
    ("sk-alice", {"tier": "default", "ttft_s": 2.5, "tbt_s": 0.3}, proto.SLO(tier="strict", ttft_s=2.5, tbt_s=0.3)),
    ("sk-alice", {"ttft_s": 1.0, "tbt_s": 0.1}, proto.SLO(tier="strict", ttft_s=1.0, tbt_s=0.1)),  # equal: ok
    ("sk-bob", {"tier": "strict"}, proto.SLO(tier="default", ttft_s=None, tbt_s=0.2)),
])
def test_http_slo_with_keys_is_the_clients_tier(keyed, tokenizer, key, diptych, slo):
    keyed.cluster.responder = replying(tokenizer, "ok")
    body = BODY if diptych is None else BODY | {"diptych": diptych}
    resp = httpx.post(keyed.http_url + "/v1/completions", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    assert keyed.cluster.wait_submit().slo == slo


@pytest.mark.parametrize("key,diptych,message", [
    ("sk-alice", {"tbt_s": 0.05}, "tbt_s=0.05 s is tighter than your tier 'strict' allows (at least 0.1 s)"),
    ("sk-alice", {"ttft_s": 0.5}, "ttft_s=0.5 s is tighter than your tier 'strict' allows (at least 1 s)"),
    ("sk-bob", {"ttft_s": 5}, "your tier 'default' sets no ttft_s target"),
    ("sk-bob", {"tier": "gold"}, "unknown tier 'gold'; known tiers: default, relaxed, strict"),
])
def test_http_keyed_client_cannot_tighten_its_targets(keyed, key, diptych, message):
    resp = httpx.post(keyed.http_url + "/v1/completions", json=BODY | {"diptych": diptych}, timeout=10,
                      headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "diptych"
    assert message in resp.json()["error"]["message"], resp.text
    assert not keyed.cluster.received(proto.SubmitRequest)


# ------------------------------------------------------------ SDK


async def test_sdk_slo_keywords(anon, keyed, tokenizer):
    anon.cluster.responder = keyed.cluster.responder = replying(tokenizer, "ok")
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        await client.complete("hi", max_tokens=2)
        assert (await asyncio.to_thread(anon.cluster.wait_submit)).slo == proto.SLO(tier="default", ttft_s=None,
                                                                                    tbt_s=0.2)
        await client.complete("hi", max_tokens=2, tier="relaxed", ttft_s=3)
        assert (await asyncio.to_thread(anon.cluster.wait_submit)).slo == proto.SLO(tier="relaxed", ttft_s=3.0,
                                                                                    tbt_s=0.5)
    async with AsyncClient(keyed.sdk_addr, api_key="sk-alice", timeout_s=10) as client:
        await client.complete("hi", max_tokens=2, tier="relaxed", tbt_s=0.25)
        assert (await asyncio.to_thread(keyed.cluster.wait_submit)).slo == proto.SLO(tier="strict", ttft_s=1.0,
                                                                                     tbt_s=0.25)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tier="gold"), "unknown tier 'gold'"),
    (dict(tbt_s=0), "tbt_s must be a positive"),
    (dict(ttft_s=-1.0), "ttft_s must be a positive"),
    (dict(tbt_s=math.nan), "tbt_s must be a positive"),
    (dict(ttft_s=math.inf), "ttft_s must be a positive"),
    (dict(tier=5), "tier must be a string"),  # the wrong types are caught by the SDK itself
    (dict(tbt_s="fast"), "tbt_s must be a number"),
    (dict(ttft_s=True), "ttft_s must be a number"),
])
async def test_sdk_bad_slo_is_bad_request(anon, kwargs, message):
    async with AsyncClient(anon.sdk_addr, timeout_s=10) as client:
        for call in (lambda: client.complete("hi", **kwargs), lambda: _drain(client.stream("hi", **kwargs))):
            with pytest.raises(BadRequestError) as info:
                await call()
            assert info.value.status == 400 and message in info.value.message
    assert not anon.cluster.received(proto.SubmitRequest)


async def test_sdk_keyed_client_cannot_tighten_its_targets(keyed):
    async with AsyncClient(keyed.sdk_addr, api_key="sk-alice", timeout_s=10) as client:
        with pytest.raises(BadRequestError) as info:
            await client.complete("hi", tbt_s=0.01)
    assert "tighter than your tier 'strict'" in info.value.message
    assert not keyed.cluster.received(proto.SubmitRequest)


async def _drain(stream) -> None:
    async for _ in stream:
        pass
