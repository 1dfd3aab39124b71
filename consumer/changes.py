"""Applied firehose events -> the unreduced change log that publishers send downstream."""

from __future__ import annotations

from collections.abc import Callable

from skyfill.storage import Change, RecordChange, RepoChange, RepoRow

from skyfill.protocol.events import Account, Commit, Event, Identity, Sync

__all__ = ["changes_for", "repo_change"]


def repo_change(row: RepoRow, *, kind: str, seq: int | None, time: str | None, source: str) -> RepoChange:
    return RepoChange(
        did=row.did, kind=kind, rev=row.rev, data_cid=row.data_cid, active=row.active, status=row.status,
        handle=row.handle, sync_state=row.sync_state, desync_reason=row.desync_reason,
        seq=seq, time=time, source=source,
    )


def changes_for(event: Event, row: RepoRow | None, want: Callable[[str], bool] | None) -> list[Change]:
    """What an event that the tracker applied changed, in order. `row` is the DID's state after it."""
    out: list[Change] = []
    if isinstance(event, Commit):
        for op in event.ops:
            if want is not None and not want(op.collection):
                continue
            out.append(
                RecordChange(
                    did=event.did, collection=op.collection, rkey=op.rkey, op=op.action, cid=op.cid,
                    rev=event.rev, seq=event.seq, time=event.time, record=op.record, source="firehose",
                )
            )
        if row is not None:
            kind = "desynchronized" if row.sync_state == "desynchronized" and row.desync_reason else "commit"
            out.append(repo_change(row, kind=kind, seq=event.seq, time=event.time, source="firehose"))
    elif row is not None and isinstance(event, (Sync, Identity, Account)):
        kind = {Sync: "sync", Identity: "identity", Account: "account"}[type(event)]
        out.append(repo_change(row, kind=kind, seq=event.seq, time=event.time, source="firehose"))
    return out
