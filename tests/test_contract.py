"""The wire contract, the registry, config decoding and placement: no Docker, no NATS."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from dispatcher.config import load_config
from dispatcher.errors import ConfigError
from runner import registry
from runner.errors import InvalidParams, UnknownKind
from runner.protocol import (
    ProgressEvent,
    Resources,
    ResultEvent,
    encode,
    event_decoder,
    job_decoder,
    params_digest,
    schema,
)
from runner.transport import redact_url


def test_job_round_trip_and_strictness() -> None:
    job = job_decoder.decode(b'{"job_id": "a-1", "kind": "probe", "params": {"hold_s": 1}}')
    assert job.resources == Resources()
    assert job_decoder.decode(encode(job)) == job
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `timeout`"):
        job_decoder.decode(b'{"job_id": "a-1", "kind": "probe", "timeout": 5}')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.job_id"):
        job_decoder.decode(b'{"job_id": "has space", "kind": "probe"}')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.resources\.memory_gb"):
        job_decoder.decode(b'{"job_id": "a", "kind": "probe", "resources": {"memory_gb": 0}}')


def test_resources_resolve_against_kind_defaults() -> None:
    defaults = Resources(cpus=0.5, memory_gb=0.5, gpus=0, gpu="never")
    assert Resources(cpus=2).resolved(defaults) == Resources(cpus=2, memory_gb=0.5, gpus=0, gpu="never")
    assert Resources().resolved(defaults) == defaults


def test_events_are_a_tagged_union_and_tolerate_new_fields() -> None:
    raw = b'{"event": "progress", "op_id": "x", "ts": 1.0, "percent": 50, "metrics": {"loss": 0.5}, "new": 1}'
    event = event_decoder.decode(raw)
    assert isinstance(event, ProgressEvent) and event.metrics == {"loss": 0.5}
    result = event_decoder.decode(encode(ResultEvent(op_id="x", ts=2.0, result={"a": 1})))
    assert isinstance(result, ResultEvent) and result.result == {"a": 1}


def test_schema_describes_job_and_events() -> None:
    doc = schema()
    text = json.dumps(doc)
    job = doc["$defs"]["Job"]
    assert set(job["required"]) == {"job_id", "kind"}
    assert "timeout_s" in job["properties"]
    for event in (
        "status",
        "progress",
        "log",
        "result",
        "error",
        "cancel_ack",
        "heartbeat",
        "trial",
        "cancel",
    ):
        assert f'"{event}"' in text
    assert "ktrdr.jobs.<kind>" in text


def test_params_digest_is_order_independent() -> None:
    assert params_digest({"a": 1, "b": 2}) == params_digest({"b": 2, "a": 1})
    assert params_digest({"a": 1}) != params_digest({"a": 2})


def test_registry_validates_params_with_field_names() -> None:
    probe = registry.get("probe")
    with pytest.raises(InvalidParams) as bad:
        probe.parse_params({"hold_s": -1})
    assert bad.value.field == "hold_s" and ">= 0" in str(bad.value)
    with pytest.raises(InvalidParams) as unknown:
        probe.parse_params({"hold": 1})
    assert unknown.value.field == "hold" and "unknown field" in str(unknown.value)
    assert probe.parse_params({"hold_s": "2"}, strict=False).hold_s == 2.0
    with pytest.raises(UnknownKind, match=r"known kinds: .*probe"):
        registry.get("nope")


def test_registry_rejects_bad_declarations() -> None:
    class P(msgspec.Struct):
        pass

    with pytest.raises(Exception, match="must match"):
        registry.operation("Bad Kind", params=P)
    with pytest.raises(Exception, match=r"msgspec\.Struct"):
        registry.operation("fine", params=dict)  # type: ignore[arg-type]


def test_config_is_strict_and_substitutes_env(tmp_path: Path) -> None:
    path = tmp_path / "ktrdr-run.toml"
    path.write_text('[nats]\nurl = "nats://${NATS_HOST}:4222"\n[dispatcher]\ncancel_grace_s = 5\n')
    config = load_config(path, env={"NATS_HOST": "10.0.0.5", "HOME": str(tmp_path)})
    assert config.nats.url == "nats://10.0.0.5:4222"
    assert config.dispatcher.cancel_grace_s == 5
    assert config.state_dir.endswith("ktrdr-run")
    with pytest.raises(ConfigError, match=r"NATS_HOST"):
        load_config(path, env={"HOME": str(tmp_path)})
    path.write_text("[nats]\nulr = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown field `ulr`"):
        load_config(path, env={})
    path.write_text("[dispatcher]\ncancel_grace_s = -1\n")
    with pytest.raises(ConfigError, match=r"cancel_grace_s"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://ktrdr:s3cret@10.0.0.5:4222", "nats://ktrdr:***@10.0.0.5:4222"),
        ("tls://tok3n@nats.lab:4222", "tls://***@nats.lab:4222"),
        ("nats://a:pw@n1:4222,nats://a:pw@n2:4222", "nats://a:***@n1:4222,nats://a:***@n2:4222"),
    ],
)
def test_urls_lose_their_secrets_before_anyone_sees_them(url: str, shown: str) -> None:
    assert redact_url(url) == shown
