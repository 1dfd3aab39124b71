"""Configuration is built once per component: the same options give the same BackfillConfig from
the command line, the environment (lambda_handler), a handler event / admin JSON body, and the
daemon's own backfills use the config `skyfill consume` was given."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click
import pytest

from skyfill.app.api import BackfillRequest, GapsRequest
from skyfill.app.application import Application
from skyfill.app.handler import config_from_env
from skyfill.app.settings import DEFAULT_DB, Settings, daemon_settings
from skyfill.backfill.config import OPTIONS, BackfillConfig, backfill_config
from skyfill.cli.backfill import backfill as backfill_command
from skyfill.cli.consume import consume as consume_command
from skyfill.cli.kafka import backfill_worker as worker_command
from skyfill.consumer.daemon import ConsumeConfig
from skyfill.errors import ConfigError

PLC = "http://127.0.0.1:9"


def _defaults(command: click.Command) -> dict[str, object]:
    return {p.name: p.default for p in command.params if p.name is not None}


def test_click_defaults_are_the_dataclass_defaults() -> None:
    config = BackfillConfig()
    for command in (backfill_command, consume_command):
        given = _defaults(command)
        for name in OPTIONS:
            if name in given and name not in ("verify", "no_verify", "allow_private_hosts"):  # flags
                assert given[name] == getattr(config, name), (command.name, name)
        assert given["db"] == DEFAULT_DB
    consume = _defaults(consume_command)
    for f in fields(ConsumeConfig):
        if f.name in consume and f.name not in ("cursor", "collections", "strict_cursor"):
            assert consume[f.name] == f.default, f.name
    assert _defaults(worker_command)["plc_url"] == config.plc_url


def test_same_options_same_config_from_every_source() -> None:
    want = BackfillConfig(plc_url=PLC, concurrency=4, per_host_rps=2.5, verify=False, allow_private_hosts=True,
                          max_car_bytes=4096, max_attempts=3)
    flat = {"plc_url": PLC, "concurrency": 4, "per_host_rps": 2.5, "no_verify": True, "allow_private_hosts": True,
            "max_car_bytes": 4096, "max_attempts": 3}
    assert backfill_config(flat) == want  # click's parsed values
    env = {"SKYFILL_" + k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in flat.items()}
    assert config_from_env(env) == want  # lambda_handler's environment
    body = {"dids": ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"], **{k: v for k, v in flat.items() if k != "no_verify"},
            "verify": False}
    assert BackfillRequest.parse(body).options.config(BackfillConfig()) == want  # admin JSON
    assert daemon_settings({"relay": "ws://127.0.0.1:1", **flat}).backfill == want  # skyfill consume


def test_unset_options_keep_the_base() -> None:
    base = BackfillConfig(plc_url=PLC, concurrency=5, allow_private_hosts=True)
    assert config_from_env({}) == BackfillConfig()
    assert BackfillRequest.parse({"from_queue": True}).options.config(base) == base
    gaps = GapsRequest.parse({"start": "2024-01-01", "end": "2024-01-02", "plc_url": "http://127.0.0.1:8"})
    assert gaps.options.config(base) == BackfillConfig(plc_url="http://127.0.0.1:8", concurrency=5,
                                                       allow_private_hosts=True)
    with pytest.raises(ConfigError, match="unknown field"):  # gaps takes the PLC options only
        GapsRequest.parse({"start": "2024-01-01", "end": "2024-01-02", "concurrency": 3})
    with pytest.raises(ConfigError, match="unknown backfill option"):
        backfill_config({"concurrenccy": 3})


def test_the_daemon_backfills_with_the_config_it_was_given(tmp_path: Path) -> None:
    settings = daemon_settings({"db": str(tmp_path / "a.duckdb"), "relay": "ws://127.0.0.1:1", "plc_url": PLC,
                                "concurrency": 3, "max_attempts": 2, "run_backfill": True})
    assert isinstance(settings, Settings) and settings.run_backfill
    app = Application(settings)
    try:
        assert app.routes.config is settings.backfill  # the admin API's /gaps and /backfill
        assert settings.backfill.concurrency == 3 and settings.backfill.max_attempts == 2
        assert app.daemon.config.relay == "ws://127.0.0.1:1" and not app.daemon.config.publish
    finally:
        app.store.close()


def test_consume_verify_is_the_firehose_check() -> None:
    """`consume --verify` checks firehose commits; it is not the backfill's `verify` (always on)."""
    settings = daemon_settings({"verify": True})
    assert settings.verify and settings.backfill.verify
    assert not daemon_settings({"verify": False}).verify
    assert daemon_settings({"verify": False}).backfill.verify


def test_bad_consume_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--collections"):
        daemon_settings({"collections": "not an nsid"})
    with pytest.raises(ConfigError, match="names no host|not a valid URL|--relay"):
        daemon_settings({"relay": "ws://[::1"})
    with pytest.raises(ConfigError, match="unknown option"):
        daemon_settings({"relays": "x"})
