"""Public parts fail with skyfill.errors types, never a bare ValueError, RuntimeError or duckdb error.

Against real parts: a real DuckDB file, real request bytes, the real constructors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from skyfill.backfill.gaps import detect_gaps
from skyfill.net.identity import Resolver
from skyfill.net.pds import PdsClient
from skyfill.net.ratelimit import HostLimiter
from skyfill.consumer.connection import Backoff
from skyfill.publish.messages import decode_value
from skyfill.publish.producer import KafkaPublisher
from skyfill.publish.requests import decode_request
from skyfill.backoff import backoff_delay
from skyfill.errors import ConfigError, InputError, PublishError, StorageError
from skyfill.storage import RepoChange, Store
from skyfill.storage.status import status_report


def test_store_read_of_a_broken_query_is_storage_error(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        with pytest.raises(StorageError):
            store.fetchall("SELECT nope FROM no_such_table")
        assert store.count_desynchronized() == 0  # the store still answers afterwards


def test_reads_of_a_closed_store_are_storage_errors(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    store.close()
    with pytest.raises(StorageError):
        store.load_repos()
    with pytest.raises(StorageError):
        store.stored_cids("did:plc:abc")
    with pytest.raises(StorageError):
        store.unqueued_desynchronized()


def test_status_report_on_a_closed_connection_is_storage_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    with store.read() as reader:
        store.close()
        with pytest.raises(StorageError):
            status_report(reader)
    with pytest.raises(StorageError):
        status_report(store)
    with pytest.raises(StorageError):
        with store.read():
            pass


async def test_gap_detection_on_a_closed_store_is_storage_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    store.close()
    start = datetime(2025, 3, 10, tzinfo=UTC)
    with pytest.raises(StorageError):
        await detect_gaps(store, start=start, end=start + timedelta(days=1), audit=None)


async def test_gap_window_ending_before_it_starts_is_config_error(tmp_path: Path) -> None:
    start = datetime(2025, 3, 10, tzinfo=UTC)
    with Store(tmp_path / "s.duckdb") as store:
        with pytest.raises(ConfigError):
            await detect_gaps(store, start=start, end=start - timedelta(days=1), audit=None)


@pytest.mark.parametrize("value", [b"", b"did:\xff\xfe", b"{", b"[1]", b'{"did": 5}'])
def test_undecodable_backfill_request_is_input_error(value: bytes) -> None:
    with pytest.raises(InputError) as info:
        decode_request(value)
    assert info.value.kind == "request"


@pytest.mark.parametrize("value", [b"\x00junk", b'{"v": 99}', b"[]"])
def test_foreign_kafka_message_is_input_error(value: bytes) -> None:
    with pytest.raises(InputError) as info:
        decode_value(value)
    assert info.value.kind == "message"


def test_bad_client_options_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        PdsClient(max_car_bytes=0)
    with pytest.raises(ConfigError):
        HostLimiter(per_host_rps=0)
    with pytest.raises(ConfigError):
        Resolver(plc_url="not a url")


async def test_publishing_before_start_is_publish_error() -> None:
    change = RepoChange(did="did:plc:abc", kind="account", rev=None, data_cid=None, active=True, status="active",
                        handle=None, sync_state="unknown", desync_reason=None, seq=1, time=None, source="firehose")
    with pytest.raises(PublishError):
        await KafkaPublisher("127.0.0.1:1").publish([change])


def test_relay_backoff_stays_finite_after_a_long_outage() -> None:
    """A relay down for hours: the reconnect delay stays within its cap (it overflowed past ~1000 tries)."""
    backoff = Backoff(base=1.0, cap=60.0)
    backoff.attempt = 5000
    assert 0.0 <= backoff.next_delay() <= 60.0


@pytest.mark.parametrize("step", [0, 1, 5, 30, 10_000])
def test_backoff_delay_stays_within_its_jitter_band(step: int) -> None:
    full = min(60.0, 2.0 * 2**min(step, 64))
    for _ in range(50):
        assert full * 0.5 <= backoff_delay(step, base=2.0, cap=60.0) <= full
