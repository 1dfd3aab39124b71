"""`make demo`: skyfill end to end on this machine, against a real local PDS + PLC.

    python -m tests.support.network.demo

1. starts the local network (reference PDS + in-memory PLC on 127.0.0.1);
2. creates accounts with history written before skyfill ever ran;
3. runs the daemon (`skyfill consume`, a real subprocess) while accounts post, like, follow,
   repost and delete;
4. stops it, lets accounts write and delete during the downtime, restarts it at the live head
   (the missed events are gone, as after an outage longer than a relay's replay window);
5. runs `skyfill gaps --enqueue` and `skyfill backfill --from-queue` (the CLI, which talks to the
   running daemon through its admin API), then `skyfill status`;
6. stops the daemon and checks the DuckDB mirror against every account's getRepo (tests/support/oracle.py);
7. stops everything. Exit status 0 only when the mirror equals the PDS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from skyfill.app.daemon_client import call_daemon, find_daemon
from tests.support.network import Create, Delete, LocalNetwork, PdsAccount, PdsClient, like_record, post_record
from tests.support.oracle import commit_seq, head_seq, mirror_diff

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
FOLLOW = "app.bsky.graph.follow"
REPOST = "app.bsky.feed.repost"
PROFILE = "app.bsky.actor.profile"
DB = "demo.duckdb"


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say()
    say(f"== {text}")


class Demo:
    def __init__(self, net: LocalNetwork, client: PdsClient, workdir: Path) -> None:
        self.net = net
        self.c = client
        self.dir = workdir
        self.env = {
            **os.environ,
            "SKYFILL_PLC_URL": net.plc_url,
            "SKYFILL_ALLOW_PRIVATE_HOSTS": "1",
            "SKYFILL_LOG_JSON": "1",
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] | None = None

    # -- the CLI --------------------------------------------------------------------------

    def skyfill(self, *args: str) -> str:
        say(f"$ skyfill {' '.join(args)}")
        out = subprocess.run([sys.executable, "-m", "skyfill", *args], cwd=self.dir, env=self.env,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise SystemExit(f"skyfill {args[0]} failed ({out.returncode}):\n{out.stderr}")
        say(out.stdout.rstrip())
        return out.stdout

    def start_daemon(self, cursor: int) -> None:
        say(f"$ skyfill consume --db {DB} --relay {self.net.pds_url} --cursor {cursor} &")
        log = (self.dir / "consume.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "skyfill", "consume", "--db", DB, "--relay", self.net.pds_url,
             "--cursor", str(cursor), "--flush-interval", "0.1"],
            cwd=self.dir, env=self.env, stdout=log, stderr=log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SystemExit(f"the daemon exited; see {self.dir / 'consume.log'}")
            info = find_daemon(self.dir / DB)
            if info is not None and info["pid"] == self.daemon.pid:
                self.info = info
                say(f"   daemon pid {self.daemon.pid}, admin API {info['url']}")
                return
            time.sleep(0.05)
        raise SystemExit("the daemon did not start")

    def wait_stored(self, seq: int) -> None:
        assert self.info is not None
        deadline = time.monotonic() + 60
        while True:
            cursors = call_daemon(self.info, "/status", timeout=10)["cursors"]
            if cursors and cursors[0]["seq"] >= seq:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not reach seq {seq}")
            time.sleep(0.1)

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(15)
            say(f"   daemon stopped (exit {self.daemon.returncode})")
        self.daemon = None
        self.info = None

    # -- activity -------------------------------------------------------------------------

    def account(self, name: str) -> PdsAccount:
        return self.c.create_account(f"{name}.test")

    def post(self, who: PdsAccount, text: str) -> Any:
        return self.c.create_record(who, POST, post_record(text))

    def run(self) -> int:
        c = self.c
        step("history: written before skyfill ever ran")
        old = [self.account(n) for n in ("alice", "bob", "carol")]
        old_posts = {u.did: [self.post(u, f"{u.handle}: old post {i}") for i in range(4)] for u in old}
        for u in old:
            c.put_record(u, PROFILE, "self", {"$type": PROFILE, "displayName": u.handle.split(".")[0].title()})
        say(f"   3 accounts, {3 * 5} records")

        step("live: the daemon runs while accounts write")
        window_start = datetime.now(UTC) - timedelta(seconds=1)
        start = head_seq(c)  # the live head, pinned (see tests/support/oracle.head_seq)
        self.start_daemon(start)
        new = [self.account(n) for n in ("dave", "erin")]
        everyone = old + new
        follows = {}
        for i, u in enumerate(everyone):
            self.post(u, f"{u.handle}: hello, live")
            other = everyone[(i + 1) % len(everyone)]
            follows[u.did] = c.create_record(
                u, FOLLOW, {"$type": FOLLOW, "subject": other.did, "createdAt": post_record("")["createdAt"]})
        like = c.create_record(new[0], LIKE, like_record(old_posts[old[0].did][0]))
        repost = like_record(old_posts[old[1].did][1]) | {"$type": REPOST}
        c.create_record(new[1], REPOST, repost)
        c.delete_record(new[0], LIKE, like.rkey)
        batch, _ = c.apply_writes(new[1], [Create(POST, post_record(f"batch {i}")) for i in range(50)])
        self.wait_stored(commit_seq(c, new[1].did, batch.rev, since=start))
        say("   5 accounts active; the daemon has stored everything up to the last write")

        step("downtime: the daemon stops, accounts keep writing")
        self.stop_daemon()
        stopped = time.monotonic()
        self.post(old[0], "alice: written while skyfill was down")
        c.delete_record(old[1], POST, old_posts[old[1].did][2].rkey)
        c.apply_writes(new[0], [Create(POST, post_record("dave: batch while down")),
                                Delete(FOLLOW, follows[new[0].did].rkey)])
        say("   alice posted, bob deleted a post, dave posted and unfollowed")
        while time.monotonic() - stopped < 6:  # gaps under 5 s are reconnects, not downtime
            time.sleep(0.2)

        step("restart at the live head: the events written while down are never delivered")
        self.start_daemon(head_seq(c))
        seen = self.post(new[1], "erin: back online")
        self.wait_stored(commit_seq(c, new[1].did, seen.commit.rev, since=start))

        step("which DIDs need a backfill, and why")
        say(f"$ export SKYFILL_PLC_URL={self.net.plc_url} SKYFILL_ALLOW_PRIVATE_HOSTS=1")
        today = datetime.now(UTC).date().isoformat()
        self.skyfill("gaps", "--db", DB, "--start", window_start.strftime("%Y-%m-%dT%H:%M:%SZ"), "--end", today,
                     "--enqueue")

        step("backfill them (through the running daemon)")
        self.skyfill("backfill", "--db", DB, "--from-queue")

        step("status")
        self.skyfill("status", "--db", DB)
        self.stop_daemon()

        step("oracle: the mirror against every account's getRepo")
        con = duckdb.connect(str(self.dir / DB), read_only=True)
        try:
            diff = mirror_diff(con, c, [u.did for u in everyone])
            records = con.execute("SELECT count(*) FROM records").fetchall()[0][0]
        finally:
            con.close()
        if diff:
            say("   MISMATCH:\n   " + "\n   ".join(diff))
            return 1
        say(f"   equal: {len(everyone)} repos, {records} records, same (collection, rkey, cid) set and rev")
        return 0


def main() -> int:
    step("starting the local network (reference PDS + PLC)")
    with tempfile.TemporaryDirectory(prefix="skyfill-demo-") as tmp, LocalNetwork() as net, net.client() as client:
        say(f"   PDS {net.pds_url}   PLC {net.plc_url}   (ready in {net.start_seconds:.1f} s)")
        demo = Demo(net, client, Path(tmp))
        try:
            code = demo.run()
        finally:
            demo.stop_daemon()
        step("stopping the network")
    say("done" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
