"""The same backfill with N Kafka workers + the sink, against a SimNetwork (the test suite's broker).

    skyfill discover / identities sync (one coordinator file, as in the single-process mode)
    skyfill gaps --enqueue kafka                        -> requests on skyfill.backfill
    N x skyfill backfill-worker --exit-when-idle        (each its own working file: a copy of the
                                                         coordinator's, so identities are in bulk)
    skyfill sink --exit-when-idle                       -> the mirror, timed on its own

The workers run at once and are timed from the first start to the last exit; the sink runs after
them so its own records/s is measured (in production it runs beside them). The mirror the sink
builds is compared with the simulated repos.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from skyfill.publish import ensure_topics

from .run import WINDOW, mirror_mismatches, run_command, skyfill_bin, vm_hwm
from .sim import SimNetwork

__all__ = ["KafkaResult", "run_kafka"]

_PARTITIONS = 8


@dataclass(frozen=True, slots=True)
class KafkaResult:
    workers: int
    repos: int
    records: int
    workers_s: float            # first worker start -> last worker exit, less one idle worker's run
    sink_s: float               # the sink command, less an idle sink's run (start-up, idle wait)
    sink_records_per_s: float   # records / sink_s
    get_repo: int
    over_limit: int
    mirror_mismatches: int
    peak_rss_mb: float          # the largest worker

    @property
    def repos_per_s(self) -> float:
        return self.repos / self.workers_s if self.workers_s > 0 else 0.0


def run_kafka(net: SimNetwork, workdir: Path, bootstrap: str, *, workers: int, timeout: float = 900.0) -> KafkaResult:
    tag = f"k{workers}-{len(net.host_specs)}h-{len(net.repos)}"
    coord = workdir / f"{tag}-coord.duckdb"
    common = ["--allow-private-hosts"]
    # `gaps --enqueue kafka` publishes on the default request topic: one broker per run
    topics = {"skyfill.backfill": _PARTITIONS, "skyfill.backfill.dead": 1, "unused.backfill": 1,
              "unused.backfill.dead": 1, f"{tag}.records": _PARTITIONS,
              f"{tag}.repos": _PARTITIONS}
    asyncio.run(ensure_topics(bootstrap, topics))
    run_command(["discover", "--relay", net.relay_url, "--db", str(coord), *common], timeout=timeout)
    run_command(["identities", "sync", "--plc-url", net.plc_url, "--db", str(coord), *common], timeout=timeout)
    net.reset_counters()
    run_command(["gaps", *WINDOW, "--db", str(coord), "--enqueue", "kafka", "--kafka-bootstrap", bootstrap, *common],
         timeout=timeout)
    # the fixed costs of a run (start-up, joining the group, the idle wait before exiting), measured
    # on empty topics and taken off the timed runs below
    idle_sink = _sink(bootstrap, workdir / f"{tag}-idle.duckdb", f"{tag}-idle", tag, timeout)
    idle_worker = _workers(net, bootstrap, [workdir / f"{tag}-idle-w.duckdb"], "unused.backfill", tag, timeout)[0]
    dbs = []
    for i in range(workers):
        db = workdir / f"{tag}-w{i}.duckdb"
        shutil.copyfile(coord, db)
        dbs.append(db)
    workers_s, peak = _workers(net, bootstrap, dbs, "skyfill.backfill", tag, timeout)
    workers_s = max(1e-3, workers_s - idle_worker)
    get_repo, over = net.get_repo_count(), net.over_limit
    mirror = workdir / f"{tag}-mirror.duckdb"
    sink_s = max(1e-3, _sink(bootstrap, mirror, f"{tag}-sink", tag, timeout) - idle_sink)
    return KafkaResult(workers, len(net.repos), net.total_records, workers_s, sink_s,
                       net.total_records / sink_s, get_repo, over, mirror_mismatches(net, str(mirror)), peak)


def _workers(net: SimNetwork, bootstrap: str, dbs: list[Path], topic: str, tag: str,
             timeout: float) -> tuple[float, float]:
    """(seconds from the first start to the last exit, the largest peak RSS in MB)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [skyfill_bin(), "--log-level", "warning", "backfill-worker", "--kafka-bootstrap", bootstrap,
             "--db", str(db), "--plc-url", net.plc_url, "--group-id", f"{tag}-{topic}-workers", "--topic", topic,
             "--records-topic", f"{tag}.records", "--repos-topic", f"{tag}.repos",
             "--exit-when-idle", "--allow-private-hosts"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for db in dbs
    ]
    peak = 0
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        peak = max([peak, *(vm_hwm(p.pid) for p in procs)])
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise RuntimeError("backfill workers timed out")
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    for p in procs:
        err = p.stderr.read() if p.stderr else ""
        if p.returncode != 0:
            raise RuntimeError(f"backfill-worker exited {p.returncode}: {err[-3000:]}")
    return seconds, peak / 1024


def _sink(bootstrap: str, db: Path, group: str, tag: str, timeout: float) -> float:
    """Seconds of one `skyfill sink --exit-when-idle` over the run's topics."""
    start = time.perf_counter()
    done = subprocess.run([skyfill_bin(), "--log-level", "warning", "sink", "--kafka-bootstrap", bootstrap,
                           "--db", str(db), "--group-id", group, "--records-topic", f"{tag}.records",
                           "--repos-topic", f"{tag}.repos", "--exit-when-idle"],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sink exited {done.returncode}: {done.stderr[-3000:]}")
    return time.perf_counter() - start
