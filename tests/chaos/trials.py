"""The chaos trials. Each takes a `Context` (one running local network, a work directory, a seeded
random generator) and returns a `TrialResult` whose `line()` is one line of figures.

Every trial ends the same way: the load stops, one sentinel write is made, the daemon stores
that sentinel's seq (it has caught up), it is stopped with SIGTERM, and tests/support/oracle.py compares
its DuckDB file with every account's getRepo (records lost / extra / stale, wrong rev).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from tests.support.kafka import KafkaBroker
from tests.support.network import Create, LocalNetwork, PdsAccount, PdsClient, post_record
from tests.support.oracle import head_seq

from ._harness import (
    ROOT,
    ChaosError,
    DaemonExited,
    DaemonProcess,
    FreezableProxy,
    HeadWatcher,
    Load,
    LogSummary,
    Verdict,
    poll,
    read_log,
    skyfill_env,
    verdict,
)

__all__ = [
    "FIXES_IN_FLIGHT",
    "TRIALS",
    "Context",
    "TrialResult",
    "broker_freeze",
    "concurrent_backfills",
    "disk_full",
    "kill9",
    "relay_freeze",
]

POST = "app.bsky.feed.post"
# Trials whose known failure is being fixed in another branch: a FAIL of these is reported with
# that branch's name. Empty: the fixes of issue 9 (items 1 and 2, branch daemon) are merged.
FIXES_IN_FLIGHT: dict[str, str] = {}
CATCH_UP = 180.0  # seconds a daemon gets to store a seq the PDS has published


@dataclass
class Context:
    net: LocalNetwork
    client: PdsClient
    workdir: Path
    rng: random.Random
    quick: bool = False

    def account(self, stem: str) -> PdsAccount:
        return self.client.create_account(f"{stem}-{secrets.token_hex(3)}.test")

    def env(self) -> dict[str, str]:
        return skyfill_env(self.net)


@dataclass
class TrialResult:
    name: str
    status: str = "pass"  # pass | FAIL | skipped
    kills: int = 0        # kill -9 of the daemon
    restarts: int = 0     # daemon starts after the first
    resumes: list[float] = field(default_factory=list)  # seconds: restart or thaw -> caught up
    verdict: Verdict | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why it failed (or what was odd)
    fix_elsewhere: str | None = None  # the branch expected to fix a failure of this trial
    seconds: float = 0.0

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.problems.append(why)

    def line(self) -> str:
        parts = [f"{self.name}: {self.status}"]
        if self.kills:
            parts.append(f"kills={self.kills}")
        if self.restarts:
            parts.append(f"restarts={self.restarts}")
        if self.resumes:
            parts.append(f"resume median={statistics.median(self.resumes):.2f}s max={max(self.resumes):.2f}s")
        v = self.verdict
        if v is not None:
            parts.append(f"repos={v.repos} records={v.records} lost={v.lost} extra={v.extra} stale={v.stale} "
                         f"wrong_rev={v.wrong_rev}")
        parts += [f"{k}={v}" for k, v in self.figures.items()]
        parts.append(f"{self.seconds:.0f}s")
        out = "  ".join(parts)
        for p in self.problems:
            out += f"\n    - {p}"
        if self.status == "FAIL" and self.fix_elsewhere:
            out += f"\n    (expected on this branch: the fix lives in branch {self.fix_elsewhere})"
        return out


# -- shared steps --------------------------------------------------------------------------------


def _finish(ctx: Context, res: TrialResult, daemon: DaemonProcess, watcher: HeadWatcher,
            accounts: list[PdsAccount], load: Load | None) -> None:
    """Stop the load, make the daemon catch up with a sentinel write, stop it, judge the mirror."""
    if load is not None:
        load.stop()
        res.figures["writes"] = load.writes
        res.figures["big_commit_ops"] = load.counts["applyWrites_ops"]
        if load.counts["error"]:
            res.figures["load_errors"] = load.counts["error"]
    sentinel = ctx.client.create_record(accounts[0], POST, post_record("chaos sentinel"))
    target = watcher.seq_of(accounts[0].did, sentinel.commit.rev)
    if not daemon.alive():
        res.fail(f"the daemon had exited by itself ({daemon.returncode}); restarted for the final check")
        daemon.reap()
        daemon.start()
        res.restarts += 1
    daemon.wait_seq(target, timeout=CATCH_UP, where="catching up with the sentinel")
    code = daemon.stop()
    if code != 0:
        res.fail(f"SIGTERM did not stop the daemon cleanly (exit {code})")
    v = verdict(daemon.db, ctx.client, [a.did for a in accounts])
    res.verdict = v
    if not v.clean:
        res.fail(f"mirror != getRepo on {len(v.diverged)} repos: " + "; ".join(v.lines[:3]))
    if v.unchecked:
        res.problems.append(f"{v.unchecked} repos not served by the PDS (left deactivated): not compared")
    (ctx.workdir / f"{res.name}.diff").write_text("\n".join(v.lines) + "\n")


def _load_accounts(ctx: Context, n: int, stem: str) -> list[PdsAccount]:
    accounts = [ctx.account(stem) for _ in range(n)]
    for a in accounts:  # some posts to update, delete and like from the first step
        ctx.client.apply_writes(a, [Create(POST, post_record(f"seed {i}")) for i in range(10)])
    return accounts


def _advanced(daemon: DaemonProcess, beyond: int, *, events: int, what: str) -> None:
    daemon.wait_seq(beyond + events, timeout=CATCH_UP, where=what)


# -- 1. kill -9 under load -----------------------------------------------------------------------


def kill9(ctx: Context, *, kills: int = 20, accounts: int = 8, gap: tuple[float, float] = (0.5, 4.0),
          backfill_share: float = 0.2) -> TrialResult:
    """kill -9 of the daemon's process group at random moments under load (some while a
    `skyfill backfill` runs through it), restart at the stored cursor, time until the stored
    cursor reaches the PDS head of the moment of the kill."""
    res = TrialResult("kill9")
    rng, env = ctx.rng, ctx.env()
    start = head_seq(ctx.client)
    daemon = DaemonProcess(ctx.workdir / "kill9.duckdb", ctx.net.pds_url, env, ctx.workdir / "kill9.log")
    during_backfill = 0
    starts: list[float] = []  # restart -> admin API up (process start), part of each resume
    with HeadWatcher(ctx.client, start) as watcher:
        try:
            daemon.start(cursor=start)
            users = _load_accounts(ctx, accounts, "kill")
            with Load(ctx.net, users, rng) as load:
                _advanced(daemon, start, events=accounts, what="storing the first writes")
                last_writes = 0
                for i in range(kills):
                    time.sleep(rng.uniform(*gap))  # a random moment: the point of this trial
                    # ... and under load: at least one write landed since the previous kill
                    poll(lambda: load.writes > last_writes, timeout=60, what="a write before the kill")
                    last_writes = load.writes
                    backfill = None
                    if rng.random() < backfill_share:
                        target = rng.choice(users).did
                        backfill = subprocess.Popen(
                            [sys.executable, "-m", "skyfill", "backfill", "--db", str(daemon.db), "--dids", target],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(rng.uniform(0.05, 1.0))
                    head = watcher.head()
                    if not daemon.alive():
                        res.fail(f"the daemon had exited ({daemon.returncode}) before kill {i + 1}")
                        break
                    daemon.kill9()
                    res.kills += 1
                    if backfill is not None:
                        during_backfill += backfill.poll() is None
                        try:
                            backfill.wait(60)
                        except subprocess.TimeoutExpired:
                            backfill.kill()
                            backfill.wait(10)
                    t0 = time.monotonic()
                    starts.append(daemon.start())  # no --cursor: resumes from the stored one
                    res.restarts += 1
                    daemon.wait_seq(head, timeout=CATCH_UP, where=f"resuming after kill {i + 1}")
                    res.resumes.append(time.monotonic() - t0)
                res.figures["kills_during_backfill"] = during_backfill
                if starts:  # resume = process start (imports, DuckDB open, admin API) + catch-up
                    res.figures["start_median_s"] = round(statistics.median(starts), 2)
                    res.figures["catchup_median_s"] = round(
                        statistics.median(r - s for r, s in zip(res.resumes, starts, strict=True)), 2)
                _finish(ctx, res, daemon, watcher, users, load)
        finally:
            daemon.kill9()
    return res


# -- 2. relay freeze -----------------------------------------------------------------------------


def relay_freeze(ctx: Context, *, proxy_seconds: float = 45, sigstop_seconds: float = 30,
                 accounts: int = 6) -> TrialResult:
    """The daemon's upstream hangs twice: (a) a proxy in front of the PDS stops forwarding while
    the PDS keeps taking writes (a stand-in for a hung relay); (b) SIGSTOP of the PDS process
    itself (load stalls too). After each thaw: time until the stored cursor passes the head."""
    res = TrialResult("relay_freeze")
    env = ctx.env()
    port = int(ctx.net.pds_url.rsplit(":", 1)[1])
    start = head_seq(ctx.client)
    with FreezableProxy(port) as proxy, HeadWatcher(ctx.client, start) as watcher:
        daemon = DaemonProcess(ctx.workdir / "relay.duckdb", f"ws://127.0.0.1:{proxy.port}", env,
                               ctx.workdir / "relay.log")
        try:
            daemon.start(cursor=start)
            users = _load_accounts(ctx, accounts, "relay")
            with Load(ctx.net, users, ctx.rng) as load:
                _advanced(daemon, start, events=accounts, what="storing the first writes")

                # (a) the proxy hangs; the PDS keeps writing
                before = daemon.stored_seq() or 0
                proxy.freeze()
                try:
                    time.sleep(proxy_seconds)  # the outage itself
                    during = daemon.stored_seq() or 0
                    head = watcher.head()
                finally:
                    proxy.thaw()
                t0 = time.monotonic()
                res.figures["proxy_backlog_events"] = head - during
                daemon.wait_seq(max(head, during + 1), timeout=CATCH_UP, where="catching up after the proxy thaw")
                res.resumes.append(time.monotonic() - t0)
                res.figures["proxy_resume_s"] = round(res.resumes[-1], 2)
                res.figures["proxy_frozen_s"] = proxy_seconds
                if during - before > 0:
                    res.figures["stored_during_proxy_freeze"] = during - before  # buffered before the freeze

                # (b) the PDS process stops (SIGSTOP); its sockets stay open
                os.killpg(ctx.net.pid, signal.SIGSTOP)
                try:  # SIGCONT before anything else can wait on the PDS (the load's join would)
                    time.sleep(sigstop_seconds)
                    head = watcher.head()
                    alive = daemon.alive()
                finally:
                    os.killpg(ctx.net.pid, signal.SIGCONT)
                t0 = time.monotonic()
                if not alive:
                    res.fail(f"the daemon exited ({daemon.returncode}) while the PDS was stopped")
                    daemon.start()
                    res.restarts += 1
                daemon.wait_seq(head + 1, timeout=CATCH_UP, where="receiving again after SIGCONT of the PDS")
                res.resumes.append(time.monotonic() - t0)
                res.figures["pds_resume_s"] = round(res.resumes[-1], 2)
                res.figures["pds_stopped_s"] = sigstop_seconds
                res.figures["proxy_connections"] = proxy.connections
                res.figures["connections_lost"] = read_log(daemon.log).count("connection lost")
                _finish(ctx, res, daemon, watcher, users, load)
        finally:
            daemon.kill9()
    return res


# -- 3. broker freeze ----------------------------------------------------------------------------


def broker_freeze(ctx: Context, *, seconds: float = 45, accounts: int = 6) -> TrialResult:
    """`--kafka-bootstrap` to a real Tansu broker, SIGSTOP the broker under load, SIGCONT; nothing
    lost in the mirror, and the topics alone (`skyfill sink`) rebuild the same records."""
    res = TrialResult("broker_freeze")
    env = ctx.env()
    start = head_seq(ctx.client)
    with (ctx.workdir / "broker.tansu.log").open("ab") as blog, KafkaBroker(log=blog) as broker, \
            HeadWatcher(ctx.client, start) as watcher:
        daemon = DaemonProcess(ctx.workdir / "broker.duckdb", ctx.net.pds_url, env, ctx.workdir / "broker.log",
                               ["--kafka-bootstrap", broker.bootstrap])
        try:
            daemon.start(cursor=start)
            users = _load_accounts(ctx, accounts, "broker")
            with Load(ctx.net, users, ctx.rng) as load:
                _advanced(daemon, start, events=accounts, what="publishing the first writes")
                before = daemon.stored_seq() or 0
                broker.freeze()
                try:
                    time.sleep(seconds)  # the outage itself
                    during = daemon.stored_seq() or 0
                    head = watcher.head()
                    alive = daemon.alive()
                finally:
                    broker.thaw()
                t0 = time.monotonic()
                res.figures["broker_frozen_s"] = seconds
                res.figures["cursor_moved_while_frozen"] = during - before
                res.figures["backlog_events"] = head - during
                if not alive:
                    res.fail(f"the daemon exited ({daemon.returncode}) while the broker was frozen")
                    daemon.start()
                    res.restarts += 1
                daemon.wait_seq(max(head, during + 1), timeout=CATCH_UP, where="catching up after the broker thaw")
                res.resumes.append(time.monotonic() - t0)
                _finish(ctx, res, daemon, watcher, users, load)
            # the topics alone must rebuild what the daemon stored
            sink_db = ctx.workdir / "broker.sink.duckdb"
            out = subprocess.run(
                [sys.executable, "-m", "skyfill", "sink", "--kafka-bootstrap", broker.bootstrap, "--db", str(sink_db),
                 "--group-id", f"chaos-{secrets.token_hex(4)}", "--exit-when-idle"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                res.fail(f"skyfill sink exited {out.returncode}: {out.stderr.strip()[-300:]}")
            else:
                want, got = _records(daemon.db), _records(sink_db)
                res.figures["sink_missing"] = len(want - got)
                res.figures["sink_extra"] = len(got - want)
                if want != got:
                    res.fail(f"the sink's records differ from the daemon's: {len(want - got)} missing, "
                             f"{len(got - want)} extra")
        finally:
            daemon.kill9()
    return res


def _records(db: Path) -> set[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {tuple(r) for r in con.execute("SELECT did, collection, rkey, cid FROM records").fetchall()}
    finally:
        con.close()


# -- 4. disk full --------------------------------------------------------------------------------


# consume's exit code when storage failed for good (consumer/cli.py), and the daemon's log lines
# for a storage outage (consumer/writer.py)
_EXIT_STORAGE = 4
_WRITE_FAILED = "storage write failed"
_INVALIDATED = "storage failed; stopping"
_RECOVERED = "storage recovered"


def disk_full(ctx: Context, *, hold: float = 30, resume_wait: float = 60, size_mb: int = 40,
              accounts: int = 4) -> TrialResult:
    """The database on a size-limited tmpfs, filled under load, then freed. Records what the daemon
    did (exit code, structured log lines, tracebacks, resumed by itself or not) and judges the
    mirror after it resumes or is restarted.

    The promised behaviour (consumer/writer.py, docs/reliability.md): on a failed write the daemon
    logs one structured `storage write failed` line and retries the same batch with backoff, then
    resumes by itself (`storage recovered`) once space returns. Exiting is accepted only the one
    way it is promised: DuckDB invalidated the database (`storage failed; stopping`), exit 4 with
    an `exiting: ...` line, and a restart resumes. A silent stall, any other exit, a bare traceback
    or a daemon still stuck after space returned fail the trial."""
    res = TrialResult("disk_full")
    if os.geteuid() != 0:
        res.status = "skipped"
        res.problems.append("skipped: not root (mount -t tmpfs needs it)")
        return res
    mnt = ctx.workdir / "small-disk"
    mnt.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        res.status = "skipped"
        res.problems.append(f"skipped: cannot mount a tmpfs ({mounted.stderr.strip()})")
        return res
    env = ctx.env()
    start = head_seq(ctx.client)
    log = ctx.workdir / "disk.log"
    daemon = DaemonProcess(mnt / "full.duckdb", ctx.net.pds_url, env, log)

    def judge_exit(code: int | None, seen: LogSummary, when: str) -> str:
        """A daemon that exited by itself: only exit 4 after DuckDB invalidated the database passes."""
        invalidated = any(e.startswith(_INVALIDATED) for e in seen.errors)
        exiting = [e for e in seen.errors if e.startswith("exiting: ")]
        if code != _EXIT_STORAGE:
            res.fail(f"exited {code} {when} (the only promised exit is {_EXIT_STORAGE}, when DuckDB invalidates "
                     f"the database)")
        elif not invalidated:
            res.fail(f"exited {code} {when} without the '{_INVALIDATED}' line (retrying was the promise)")
        if not exiting:
            res.fail(f"exited {code} {when} without its one-line 'exiting: ...' message")
        return f"exited {code} {when}{' (database invalidated)' if invalidated else ''}"

    try:
        with HeadWatcher(ctx.client, start) as watcher:
            daemon.start(cursor=start)
            users = _load_accounts(ctx, accounts, "disk")
            with Load(ctx.net, users, ctx.rng) as load:
                _advanced(daemon, start, events=accounts, what="storing the first writes")
                log_offset = log.stat().st_size
                filled = _fill(mnt / "filler")
                res.figures["filled_mb"] = round(filled / 2**20, 1)
                at_full = daemon.stored_seq() or 0
                t_full = time.monotonic()
                exited_at: float | None = None
                while time.monotonic() - t_full < hold:  # observe the daemon on a full disk
                    if not daemon.alive():
                        exited_at = time.monotonic() - t_full
                        break
                    time.sleep(0.25)
                seen = read_log(log, offset=log_offset)
                failed_lines = sum(n for msg, n in seen.messages.items() if msg.startswith(_WRITE_FAILED))
                res.figures["error_lines"] = len(seen.errors)
                res.figures["tracebacks"] = seen.tracebacks
                if seen.errors:
                    res.figures["first_error"] = json.dumps(seen.errors[0][:120])
                stored_full = daemon.stored_seq()
                if exited_at is not None:
                    res.figures["behaviour"] = judge_exit(daemon.reap(), seen, f"after {exited_at:.1f}s on a full disk")
                else:
                    progressed = stored_full is not None and stored_full > at_full
                    res.figures["behaviour"] = (f"alive, retrying, cursor {'advanced' if progressed else 'held'} "
                                                f"({at_full}->{stored_full}) over {hold:.0f}s, head {watcher.head()}")
                    if not failed_lines:
                        if progressed:
                            res.fail(f"inconclusive: no write failed in {hold:.0f}s on a 'full' disk "
                                     f"({res.figures['filled_mb']} MB filler)")
                        else:
                            res.fail(f"silent stall: alive {hold:.0f}s on a full disk, cursor stuck, "
                                     f"no '{_WRITE_FAILED}' line")
                (mnt / "filler").unlink()
                head = watcher.head()
                t_free = time.monotonic()
                if daemon.alive():
                    offset = log.stat().st_size
                    try:
                        daemon.wait_seq(head + 1, timeout=resume_wait, where="resuming after space returned")
                        res.resumes.append(time.monotonic() - t_free)
                        recovered = read_log(log, offset=log_offset).count(_RECOVERED)
                        res.figures["after_free"] = (f"resumed by itself in {res.resumes[-1]:.1f}s "
                                                     f"('{_RECOVERED}' x{recovered})")
                        if failed_lines and not recovered:
                            res.fail(f"resumed without a '{_RECOVERED}' line")
                    except DaemonExited:
                        res.figures["after_free"] = judge_exit(daemon.reap(), read_log(log, offset=offset),
                                                               "after space returned")
                    except ChaosError:
                        res.fail(f"did not resume within {resume_wait:.0f}s of space returning")
                        code = daemon.stop()
                        after = read_log(log, offset=offset)
                        res.figures["after_free"] = (f"no resume in {resume_wait:.0f}s; SIGTERM -> exit {code}"
                                                     f"{' with a traceback' if after.tracebacks else ''}")
                if not daemon.alive():
                    t0 = time.monotonic()
                    daemon.start()
                    res.restarts += 1
                    daemon.wait_seq(head, timeout=CATCH_UP, where="catching up after a restart on freed space")
                    res.resumes.append(time.monotonic() - t0)
                _finish(ctx, res, daemon, watcher, users, load)
            tail = read_log(log)
            if tail.tracebacks:
                res.fail(f"{tail.tracebacks} bare traceback(s) in {log.name}")
    finally:
        daemon.kill9()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    return res


def _fill(path: Path) -> int:
    """Write zeros until the filesystem says ENOSPC; returns the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                n = os.write(fd, chunk)
            except OSError:
                break
            written += n
            if n == 0:
                break
        # the last partial chunk: fill the remaining few KB too
        for size in (1 << 16, 1 << 12, 1 << 9):
            while True:
                try:
                    written += os.write(fd, chunk[:size])
                except OSError:
                    break
    finally:
        os.close(fd)
    return written


# -- 5. concurrent backfills ---------------------------------------------------------------------


# The real CLI entry point (`python -m skyfill backfill ...`), imported first and then held until
# the trial writes a line to its stdin: two of them then start within a millisecond of each other
# instead of a process start-up (1-2 s on a busy machine) apart, which would serialize them.
_HELD_CLI = (
    "import runpy, sys\n"
    "import skyfill.cli\n"
    "print('ready', file=sys.stderr, flush=True)\n"
    "sys.stdin.readline()\n"
    "sys.argv = ['skyfill', *sys.argv[1:]]\n"
    "runpy.run_module('skyfill', run_name='__main__')\n"
)


def concurrent_backfills(ctx: Context, *, rounds: int = 6, control_rounds: int = 2, writes_before: int = 3,
                         seed_records: int = 400) -> TrialResult:
    """Each round: one account keeps writing while two `skyfill backfill --dids X` run at once
    through the running daemon. One account per round, so a divergence left by a round is not
    repaired by the next; all are compared with getRepo at the end. Control rounds run the same
    two backfills one after the other under the same writes: they must stay equal, which shows
    that a divergence of the concurrent rounds comes from the concurrency."""
    res = TrialResult("concurrent_backfills")
    rng, env = ctx.rng, ctx.env()
    start = head_seq(ctx.client)
    daemon = DaemonProcess(ctx.workdir / "twin.duckdb", ctx.net.pds_url, env, ctx.workdir / "twin.log")
    outcomes: list[str] = []
    writes = 0
    with HeadWatcher(ctx.client, start) as watcher:
        try:
            daemon.start(cursor=start)
            targets = _load_accounts(ctx, rounds + control_rounds, "twin")
            together = {x.did for x in targets[:rounds]}
            for x in targets:  # a repo big enough that a backfill takes a while
                for _ in range(max(0, seed_records - 10) // 200):
                    ctx.client.apply_writes(x, [Create(POST, post_record(f"history {i}")) for i in range(200)])
            order = list(targets)
            rng.shuffle(order)
            for x in order:
                with Load(ctx.net, [x], rng, big_share=0.0, lifecycle_share=0.0) as load:
                    poll(lambda: load.writes >= writes_before, timeout=60, what="the account's first writes")
                    cmd = [sys.executable, "-c", _HELD_CLI, "backfill", "--db", str(daemon.db), "--dids", x.did,
                           "--json"]
                    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
                    for p in procs:
                        assert p.stderr is not None
                        p.stderr.readline()  # "ready": imported, waiting for the go
                    if x.did in together:
                        for p in procs:
                            _go(p)
                    for p in procs:
                        if x.did not in together:
                            _go(p)  # control: the second starts when the first has finished
                        try:
                            out, err = p.communicate(timeout=180)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            out, err = p.communicate()
                        outcomes.append(_backfill_outcome(p.returncode, out, err))
                        with (ctx.workdir / "twin.backfills.jsonl").open("a") as f:
                            f.write(json.dumps({"did": x.did, "together": x.did in together, "code": p.returncode,
                                                "out": out[-2000:], "err": err[-2000:]}) + "\n")
                    after = load.writes
                    poll(lambda: load.writes >= after + 2, timeout=60, what="writes after the backfills")
                writes += load.writes
            res.figures["backfills"] = ",".join(sorted(set(outcomes)))
            _finish(ctx, res, daemon, watcher, targets, None)
            res.figures["writes"] = writes
            if res.verdict is not None:
                diverged = res.verdict.diverged
                res.figures["rounds_diverged"] = f"{len(diverged & together)}/{rounds}"
                res.figures["control_diverged"] = f"{len(diverged - together)}/{control_rounds}"
                if diverged - together:
                    res.problems.append("a control round (backfills one after the other) diverged too: "
                                        "not (only) a concurrency bug")
        finally:
            daemon.kill9()
    return res


def _go(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()


def _backfill_outcome(code: int | None, out: str, err: str) -> str:
    if code != 0:
        return f"exit{code}:{(err.strip().splitlines() or [''])[-1][:60]}"
    try:
        summary = json.loads(out)
    except ValueError:
        return "ok:unparsed"
    if summary.get("failed"):
        return f"failed:{summary['failed']}"
    return "ok"


TRIALS: dict[str, Callable[[Context], TrialResult]] = {
    "kill9": lambda ctx: kill9(ctx, kills=5 if ctx.quick else 20, accounts=4 if ctx.quick else 8),
    "relay_freeze": lambda ctx: relay_freeze(ctx, proxy_seconds=10 if ctx.quick else 60,
                                             sigstop_seconds=8 if ctx.quick else 30),
    "broker_freeze": lambda ctx: broker_freeze(ctx, seconds=15 if ctx.quick else 45),
    "disk_full": lambda ctx: disk_full(ctx, hold=12 if ctx.quick else 30, resume_wait=20 if ctx.quick else 60),
    "concurrent_backfills": lambda ctx: concurrent_backfills(ctx, rounds=4 if ctx.quick else 8, control_rounds=2 if ctx.quick else 3),
}
