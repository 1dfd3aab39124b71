"""DuckLake's own upkeep of a lake's files (`skyfill compact` on a lake, under the compaction lease).

Every commit of a lake writes new Parquet files and a snapshot; DELETEs (compaction) write delete
files, and nothing old is ever removed by itself. In order:
    merge      ducklake_merge_adjacent_files: a table's many small files -> fewer, larger ones
    expire     ducklake_expire_snapshots older than the retention: time travel before it is gone,
               and the files only those snapshots referenced are scheduled for deletion
    cleanup    ducklake_cleanup_old_files: delete the scheduled files (older than the retention)
    orphans    ducklake_delete_orphaned_files older than the retention: files no snapshot knows,
               e.g. written by a writer killed (-9) before its commit. A running writer's files
               are orphans until it commits, so the retention must exceed any transaction's length
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from .lake import LAKE_ALIAS

__all__ = ["LakeUpkeep", "upkeep"]


@dataclass(frozen=True, slots=True)
class LakeUpkeep:
    merged: int             # files the merge wrote
    expired_snapshots: int
    deleted_files: int      # scheduled files deleted (of expired snapshots, merged away)
    orphans: int            # files no snapshot referenced, deleted


def _count(cur: duckdb.DuckDBPyConnection, call: str, params: list[object]) -> int:
    return int(cur.execute(f"SELECT count(*) FROM {call}", params).fetchall()[0][0])


def upkeep(cur: duckdb.DuckDBPyConnection, *, retention_seconds: float) -> LakeUpkeep:
    """Run the four steps (module docstring) on the lake of `cur`, each its own commit."""
    older = "now() - to_microseconds(CAST(? * 1e6 AS BIGINT))"
    merged = _count(cur, f"ducklake_merge_adjacent_files('{LAKE_ALIAS}')", [])
    expired = _count(cur, f"ducklake_expire_snapshots('{LAKE_ALIAS}', older_than => {older})", [retention_seconds])
    deleted = _count(cur, f"ducklake_cleanup_old_files('{LAKE_ALIAS}', older_than => {older})", [retention_seconds])
    orphans = _count(cur, f"ducklake_delete_orphaned_files('{LAKE_ALIAS}', older_than => {older})", [retention_seconds])
    return LakeUpkeep(merged, expired, deleted, orphans)
