"""deploy/prometheus and deploy/grafana checked for real: a real Prometheus (the Debian package,
`make prometheus` installs it) scrapes a real `skyfill consume`, and every shipped alert fires when
its condition is produced.

Real parts: Prometheus and promtool; the daemon as a subprocess on a real DuckDB file; a local relay
(tests/support/relay.py, a WebSocket server replaying generated signed frames: a stand-in for a real
relay, so that the test can freeze it); a local HTTP server playing PLC and PDS; a local Kafka broker
(Tansu). Prometheus runs on the shipped prometheus.yml and skyfill-rules.yml with only the target,
the intervals (1 s) and the rules' durations rewritten (`_test_rules`).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import libipld
import pytest

from tests.support.generate.firehose import World
from tests.support.kafka import KafkaBroker

from .support.daemon import ROOT, announced, reap, spawn_consume
from .support.faultserver import FaultServer
from .support.relay import LocalRelay
from .support.served import break_chain, serve_firehose_world
from .support.wait import free_port, poll

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "skyfill-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "skyfill-rules.test.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "skyfill.json"
ALERTS = {"SkyfillDown", "SkyfillFirehoseLagHigh", "SkyfillCursorNotAdvancing", "SkyfillDesynchronizedGrowing",
          "SkyfillBackfillFailing", "SkyfillKafkaDisconnected"}

# The shipped rules' ranges, shortened for a 1 s scrape (each range in the file must be listed here).
# The cursor's window stays longer than any pause of a loaded test machine between two batches.
_RANGES = {"5m": "10s", "15m": "1m", "30m": "1m"}
_FOR = "2s"
# Grafana's variables in the dashboard's queries: $__rate_interval is 4 scrape intervals at least
_VARIABLES = {"$__rate_interval": "10s", "$__interval": "2s", "$instance": ".+"}


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `make prometheus` installs the Debian package (apt-get install prometheus)"
    return path


def _test_rules(text: str) -> str:
    """The shipped rules with their durations shortened; thresholds, expressions and names unchanged."""
    ranges = set(re.findall(r"\[(\w+)\]", text))
    assert ranges <= set(_RANGES), f"a range the test does not know how to shorten: {ranges - set(_RANGES)}"
    text = re.sub(r"\[(\w+)\]", lambda m: f"[{_RANGES[m.group(1)]}]", text)
    text, n = re.subn(r"^(\s+for:) \w+$", rf"\1 {_FOR}", text, flags=re.MULTILINE)
    assert n == len(ALERTS)
    return text


def _test_config(text: str, *, target: str, rules: Path) -> str:
    """The shipped scrape config pointed at the test's daemon and rules, scraping and evaluating every second."""
    for old, new in [("scrape_interval: 15s", "scrape_interval: 1s"), ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                     ('"127.0.0.1:9100"', f'"{target}"'), ("- skyfill-rules.yml", f"- {rules}")]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana's variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in _VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            found.append((panel["title"], expr))
    return found


# -- the files ---------------------------------------------------------------------------------------


def test_promtool_accepts_the_shipped_rules_and_config() -> None:
    promtool = _binary("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in rules.stdout
    config = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    assert set(re.findall(r"alert: (\w+)", RULES.read_text())) == ALERTS


def test_the_shipped_rules_pass_their_unit_tests_at_their_real_durations() -> None:
    """deploy/prometheus/skyfill-rules.test.yml: each alert fires at its threshold after its `for:`, and
    not on its look-alikes (a disconnected relay, accounts gone, a daemon without Kafka, ...)."""
    result = subprocess.run([_binary("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text()))
    assert tested == ALERTS


def test_the_dashboard_is_a_grafana_model_on_a_prometheus_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    assert len(_queries()) >= 20


# -- a real Prometheus scraping a real daemon ----------------------------------------------------------


class _Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        rules = tmp / "rules.yml"
        rules.write_text(_test_rules(RULES.read_text()))
        subprocess.run([_binary("promtool"), "check", "rules", str(rules)], check=True, capture_output=True)
        config = tmp / "prometheus.yml"
        config.write_text(_test_config(CONFIG.read_text(), target=target, rules=rules))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=log)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.http.get("/api/v1/query", params={"query": expr}).raise_for_status().json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def alerts(self) -> dict[str, str]:
        """alertname -> state (pending, firing) of the active alerts."""
        body = self.http.get("/api/v1/alerts").raise_for_status().json()
        return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}

    def wait_firing(self, *names: str, timeout: float = 90) -> None:
        try:
            poll(lambda: all(self.alerts().get(n) == "firing" for n in names), timeout=timeout, interval=0.5,
                 what=f"{', '.join(names)} firing")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; active alerts: {self.alerts()}") from None

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class _Feeder:
    """Appends frames to the relay, a few at a time, while running: a live firehose that can freeze."""

    def __init__(self, relay: LocalRelay, frames: list[bytes], *, per_tick: int = 10, tick: float = 0.2) -> None:
        self._relay, self._frames, self._per_tick, self._tick = relay, frames, per_tick, tick
        self._running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            if self._running.is_set() and self._frames:
                chunk, self._frames = self._frames[: self._per_tick], self._frames[self._per_tick :]
                self._relay.append(chunk)

    def resume(self) -> None:
        self._running.set()

    def freeze(self) -> None:
        self._running.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _commits(frames: list[bytes], did: str) -> int:
    n = 0
    for frame in frames:
        header, body = libipld.decode_dag_cbor_multi(frame)
        n += header.get("t") == "#commit" and body.get("repo") == did
    return n


@pytest.fixture
def plc_pds_and_frames() -> Iterator[tuple[FaultServer, list[bytes]]]:
    """A local PLC + PDS serving a generated world's DID documents and its repos as they were before its
    firehose, and 6,000 frames of that firehose without the second commit of one DID (the victim): the
    daemon marks the victim desynchronized, and its backfill fails (its repo is over --max-car-bytes 1024),
    so it stays desynchronized."""
    world = World(31, n_dids=8, initial_records=(20, 20))
    assert min(len(world.repo_car(did)) for did in world.dids) > 1024
    with FaultServer() as srv:
        serve_firehose_world(srv, world)
        frames = list(world.frames(6_000))
        victim = max(world.dids, key=lambda d: _commits(frames[:400], d))
        assert _commits(frames[:400], victim) >= 3
        yield srv, break_chain(frames, victim)


def test_prometheus_scrapes_the_daemon_every_panel_has_data_and_the_alerts_fire(
    kafka_broker: KafkaBroker, plc_pds_and_frames: tuple[FaultServer, list[bytes]], tmp_path: Path
) -> None:
    srv, frames = plc_pds_and_frames
    metrics_port = free_port()
    db = tmp_path / "p.duckdb"
    daemon_log = tmp_path / "daemon.log"
    prometheus = _Prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    proc: subprocess.Popen[bytes] | None = None
    # a bad frame up front: the errors panel has a series
    with LocalRelay(frames[:300] + [b"\xa1not cbor"]) as relay, daemon_log.open("wb") as log:
        feeder = _Feeder(relay, frames[300:])
        try:
            poll(prometheus.ready, timeout=60, interval=0.2, what="Prometheus ready")
            proc = spawn_consume(
                db, relay.url, "--cursor", "0", "--flush-interval", "0.05", "--metrics-port", str(metrics_port),
                "--backfill", "--max-car-bytes", "1024", "--plc-url", srv.url, "--allow-private-hosts",
                "--kafka-bootstrap", kafka_broker.bootstrap, stderr=log,
            )
            announced(db, proc, log=daemon_log, timeout=60)
            feeder.resume()
            # one reconnect: the reconnects panel has a series
            poll(lambda: len(relay.connections) >= 1, what="the daemon connected")
            relay.drop_all()
            poll(lambda: len(relay.connections) >= 2, what="the daemon reconnected")

            # 1. a flowing firehose: every panel returns data; the old events (2025) put the lag above
            # 5 minutes, the broken chain grows the desynchronized DIDs, its backfill fails
            empty: list[tuple[str, str]] = []

            def every_panel_has_data() -> bool:
                empty[:] = [(title, expr) for title, expr in _queries() if not prometheus.query(expr)]
                return not empty

            try:
                poll(every_panel_has_data, timeout=120, interval=1, what="data in every panel")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; empty: {empty}") from None
            prometheus.wait_firing("SkyfillFirehoseLagHigh", "SkyfillDesynchronizedGrowing", "SkyfillBackfillFailing")
            active = prometheus.alerts()
            # while events flow and the daemon is up, these do not fire (pending: a loaded machine may
            # pause the daemon for a moment)
            for name in ("SkyfillCursorNotAdvancing", "SkyfillKafkaDisconnected", "SkyfillDown"):
                assert active.get(name) != "firing", active
            assert prometheus.query('up{job="skyfill"} == 1')

            # 2. the relay freezes (the WebSocket stays open): the stored cursor stops
            feeder.freeze()
            prometheus.wait_firing("SkyfillCursorNotAdvancing")
            assert prometheus.query('skyfill_firehose_connected{job="skyfill"} == 1')

            # 3. the broker freezes while the firehose flows again: the publisher's sends time out
            kafka_broker.freeze()
            feeder.resume()
            prometheus.wait_firing("SkyfillKafkaDisconnected", timeout=120)
            kafka_broker.thaw()

            # 4. the daemon dies
            proc.kill()
            proc.wait(10)
            prometheus.wait_firing("SkyfillDown")
        finally:
            kafka_broker.thaw()
            feeder.close()
            if proc is not None:
                reap(proc)
            prometheus.close()
