"""The status page as one self-contained HTML document: inline CSS and server-side SVG, no script,
no font, no request beyond the page itself (it works offline, from a file as from the daemon).

Numbers an operator (or a test) looks for carry ids: #consumer, #cursor, #lag, #repos-total,
#records-total, #desynchronized, #covered, #downtime-count, #repaired-ok, #repaired-failed,
#to-repair, #parked-count; sections are #ingest, #coverage, #repos, #backfill, #records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from html import escape
from typing import Any, Final

from skyfill.storage import Store

from .live import IngestHistory
from .status_page import StatusPage, build_page, page_window

__all__ = ["render", "page_html", "CachedPages"]

_W: Final = 960
_PAD_L: Final = 56
_PAD_R: Final = 12

_CSS: Final = """
:root{--fg:#1d2330;--mute:#667085;--line:#e4e7ec;--bg:#f6f7f9;--ok:#2e9d5b;--bad:#d64545;--fix:#3b6fd8;
--warn:#e0892b;--card:#fff}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}header{display:flex;flex-wrap:wrap;gap:12px 24px;align-items:baseline;
padding:14px 24px;background:#1d2330;color:#fff}header h1{font-size:18px;margin:0}header .meta{color:#c7cbd4}
header form{margin-left:auto;display:flex;gap:6px;align-items:center}header input{width:190px;padding:3px 6px;
border-radius:4px;border:1px solid #556;background:#2a3142;color:#fff}header button{padding:3px 10px;
border-radius:4px;border:0;background:#3b6fd8;color:#fff}main{padding:16px 24px;display:grid;gap:16px;
max-width:1100px;margin:0 auto}section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px}
h2{font-size:15px;margin:0 0 10px}.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));
gap:10px}.tile{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.tile .v{font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}.tile .v.long{font-size:17px}.tile .k{color:var(--mute);font-size:12px;
overflow-wrap:anywhere}
.good{color:var(--ok)}.bad{color:var(--bad)}.mute{color:var(--mute)}table{border-collapse:collapse;width:100%}
td,th{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;font-variant-numeric:tabular-nums}
td.n,th.n{text-align:right}.bar{height:10px;background:var(--line);border-radius:5px;overflow:hidden;
display:flex;min-width:120px}.bar i{display:block;height:100%}.legend span{margin-right:14px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:-1px}
svg text{font:11px system-ui,sans-serif;fill:#667085}.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px}
@media(max-width:800px){.cols{grid-template-columns:1fr}}
"""

_STATE_COLORS: Final = {"synchronized": "var(--ok)", "desynchronized": "var(--bad)", "unknown": "#a0a7b4"}


def _n(value: Any) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else escape(str(value))


def _t(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def _dur(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}" if value >= 1 else f"{value:.2f}"


def _tile(key: str, value: str, ident: str, cls: str = "") -> str:
    cls += " long" if len(value) > 10 else ""
    return f'<div class="tile"><div class="v {cls}" id="{ident}">{value}</div><div class="k">{escape(key)}</div></div>'


class _Axis:
    """Time -> x over [since, until] in an SVG `_W` wide."""

    def __init__(self, since: datetime, until: datetime) -> None:
        self.since, self.until = since, until
        self.span = max(1e-9, (until - since).total_seconds())

    def x(self, ts: datetime) -> float:
        f = (ts - self.since).total_seconds() / self.span
        return _PAD_L + max(0.0, min(1.0, f)) * (_W - _PAD_L - _PAD_R)

    def ticks(self, y: float, height: float) -> str:
        fmt = "%H:%M:%S" if self.span < 3600 else "%H:%M" if self.span <= 2 * 86400 else "%m-%d %H:%M"
        out = []
        for i in range(7):
            ts = self.since + timedelta(seconds=self.span * i / 6)
            x = self.x(ts)
            anchor = "start" if i == 0 else "end" if i == 6 else "middle"
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - height:.1f}" y2="{y:.1f}" stroke="#eef0f3"/>'
                       f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="{anchor}">{ts.strftime(fmt)}</text>')
        return "".join(out)


def _line_chart(page: StatusPage, values: Sequence[tuple[datetime, float | None]], *, ident: str, unit: str,
                color: str, mode: str) -> str:
    axis, h, top = _Axis(page.since, page.until), 150, 10
    base = top + h
    pts = [(ts, v) for ts, v in values if v is not None]
    peak = max((v for _, v in pts), default=0.0) or 1.0
    body = [axis.ticks(base, h), f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{base}" y2="{base}" stroke="#c9ced6"/>',
            f'<text x="{_PAD_L - 6}" y="{top + 4}" text-anchor="end">{_rate(peak)}</text>',
            f'<text x="{_PAD_L - 6}" y="{base}" text-anchor="end">0</text>',
            f'<text x="{_PAD_L - 6}" y="{top + h / 2:.0f}" text-anchor="end">{escape(unit)}</text>']
    if not pts:
        body.append(f'<text x="{_W / 2}" y="{top + h / 2:.0f}" text-anchor="middle">no samples in this window</text>')
    else:
        coords = [(axis.x(ts), base - v / peak * h) for ts, v in pts]
        if mode == "steps":  # per-run averages: one flat segment per run
            segs = [f"M{coords[i][0]:.1f},{coords[i][1]:.1f}L{coords[i + 1][0]:.1f},{coords[i + 1][1]:.1f}"
                    for i in range(0, len(coords) - 1, 2)]
            body.append(f'<path d="{" ".join(segs)}" stroke="{color}" stroke-width="3" fill="none"/>')
        elif mode == "dots":  # one value per run, at its end
            body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>{_rate(v)} {escape(unit)} at '
                     f'{_t(ts)}</title></circle>' for (x, y), (ts, v) in zip(coords, pts, strict=True)]
        else:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            body.append(f'<polyline points="{line}" stroke="{color}" stroke-width="1.6" fill="none"/>')
    return (f'<svg id="{ident}" viewBox="0 0 {_W} {base + 22}" width="100%" role="img" '
            f'aria-label="{escape(unit)} over time">{"".join(body)}</svg>')


def _ingest(page: StatusPage) -> str:
    steps = page.history_kind == "runs"
    rates = [(p.at, p.rate) for p in page.history]
    # per run: the lag it stopped at, at its end (the start points carry none)
    lags = [(p.at, p.lag) for i, p in enumerate(page.history) if not steps or i % 2]
    last = page.history[-1] if page.history else None
    note = ("Sampled by this daemon every 10 s (kept 24 h; a restart starts over)." if not steps else
            "No daemon holds this file: one average per consumer run (seq/s between its first and last "
            "event) and the lag it stopped at, from the coverage rows.")
    now = ""
    if last is not None and not steps:
        lag = "–" if last.lag is None else f"{last.lag:.1f}"
        now = f'<p>Now: <b id="rate-now">{_rate(last.rate)}</b> events/s, lag <b>{lag} s</b></p>'

    rate_chart = _line_chart(page, rates, ident="chart-rate", unit="events/s", color="#3b6fd8",
                             mode="steps" if steps else "line")
    lag_chart = _line_chart(page, lags, ident="chart-lag", unit="lag s", color="#e0892b",
                            mode="dots" if steps else "line")
    return (f'<section id="ingest"><h2>Ingest rate and lag</h2><p class="mute">{note}</p>{now}'
            f'{rate_chart}{lag_chart}</section>')


def _coverage(page: StatusPage) -> str:
    axis = _Axis(page.since, page.until)
    end = min(page.until, page.generated_at)
    body = [axis.ticks(118, 112), '<text x="4" y="26">covered</text>', '<text x="4" y="92">repaired</text>']
    for span in page.timeline.spans:
        a, b = span.first_event_at, page.generated_at if span.running else span.last_event_at
        if a is None or b is None or b < page.since or a > end:
            continue
        x0, x1 = axis.x(max(a, page.since)), axis.x(min(b, end))
        label = escape(f"run {_t(a)} → {'running' if span.running else _t(b)}, seq {span.first_seq}–{span.last_seq}, "
                       f"ended {span.ended}")
        body.append(f'<rect class="span" x="{x0:.1f}" y="12" width="{max(1.5, x1 - x0):.1f}" height="22" '
                    f'fill="#2e9d5b"><title>{label}</title></rect>')
    for a, b in page.downtime:
        x0, x1 = axis.x(a), axis.x(b)
        body.append(f'<rect class="downtime" x="{x0:.1f}" y="38" width="{max(1.5, x1 - x0):.1f}" height="10" '
                    f'fill="#d64545"><title>{escape(f"downtime {_t(a)} → {_t(b)} ({_dur((b - a).total_seconds())})")}'
                    f'</title></rect>')
    peak = max((ok + failed for _, ok, failed in page.timeline.repaired_buckets), default=0) or 1
    step = timedelta(seconds=page.timeline.bucket_seconds)
    for at, ok, failed in page.timeline.repaired_buckets:
        x0, x1 = axis.x(at), axis.x(at + step)
        w = max(1.5, x1 - x0 - 1)
        h_ok, h_bad = 48 * ok / peak, 48 * failed / peak
        body.append(f'<rect class="repaired" x="{x0:.1f}" y="{104 - h_ok:.1f}" width="{w:.1f}" height="{h_ok:.1f}" '
                    f'fill="#3b6fd8"><title>{ok} repos backfilled from {_t(at)}</title></rect>')
        if failed:
            body.append(f'<rect x="{x0:.1f}" y="{104 - h_ok - h_bad:.1f}" width="{w:.1f}" height="{h_bad:.1f}" '
                        f'fill="#e0892b"><title>{failed} backfills failed from {_t(at)}</title></rect>')
    svg = (f'<svg id="coverage-chart" viewBox="0 0 {_W} 140" width="100%" role="img" aria-label="coverage">'
           f'{"".join(body)}</svg>')
    legend = ('<p class="legend"><span><i class="sw" style="background:#2e9d5b"></i>consumer runs</span>'
              '<span><i class="sw" style="background:#d64545"></i>downtime (no run covered it)</span>'
              '<span><i class="sw" style="background:#3b6fd8"></i>repos backfilled</span>'
              '<span><i class="sw" style="background:#e0892b"></i>backfills failed</span></p>')
    rows = "".join(f"<tr><td>{_t(a)}</td><td>{_t(b)}</td><td class=n>{_dur((b - a).total_seconds())}</td></tr>"
                   for a, b in page.downtime) or '<tr><td colspan=3 class="mute">none: the window is covered</td></tr>'
    reasons = "".join(f"<tr><td>{escape(k)}</td><td class=n>{v:,}</td></tr>"
                      for k, v in page.timeline.repaired_by_reason.items()) or \
        '<tr><td colspan=2 class="mute">no queued backfill finished in the window</td></tr>'
    todo = "".join(f"<tr><td>{escape(k)}</td><td class=n>{v:,}</td></tr>" for k, v in page.to_repair.items()) or \
        '<tr><td colspan=2 class="good">nothing: no gap found</td></tr>'
    return (f'<section id="coverage"><h2>Coverage {_t(page.since)} → {_t(page.until)}</h2>{svg}{legend}'
            f'<div class="cols"><div><h2>Downtime</h2><table><tr><th>from</th><th>to</th><th class=n>length</th></tr>'
            f'{rows}</table></div><div><h2>Repaired in the window (queued backfills done, by reason)</h2>'
            f'<table>{reasons}</table><h2 style="margin-top:12px">Still to repair '
            f'(<code>skyfill gaps</code>, no PDS audit)</h2><table>{todo}</table></div></div></section>')


def _bars(counts: dict[str, int], colors: dict[str, str], ident: str) -> str:
    total = sum(counts.values()) or 1
    palette = ["#3b6fd8", "#8e5bd8", "#e0892b", "#2aa1a1", "#a0a7b4", "#d64545"]
    rows = []
    for i, (k, v) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1])):
        color = colors.get(k, palette[i % len(palette)])
        rows.append(f'<tr><td>{escape(str(k))}</td><td class=n data-state="{escape(str(k))}">{v:,}</td>'
                    f'<td style="width:55%"><div class="bar"><i style="width:{100 * v / total:.1f}%;'
                    f'background:{color}"></i></div></td></tr>')
    return f'<table id="{ident}">{"".join(rows) or "<tr><td class=mute>none</td></tr>"}</table>'


def _repos(page: StatusPage) -> str:
    repos = page.report["repos"]
    return (f'<section id="repos"><h2>Repos by sync state ({repos["total"]:,})</h2>'
            f'{_bars(repos["by_sync_state"], _STATE_COLORS, "sync-states")}<div class="cols"><div><h2 style="margin-top:12px">'
            f'By account status</h2>{_bars(repos["by_status"], {"active": "var(--ok)"}, "statuses")}</div><div>'
            f'<h2 style="margin-top:12px">By last backfill</h2>'
            f'{_bars(repos["by_backfill_status"], {"ok": "var(--ok)", "never": "#a0a7b4"}, "backfill-statuses")}'
            f'</div></div></section>')


def _hosts(hosts: Iterable[tuple[str, dict[str, int]]], live: bool) -> str:
    cols = ("queued", "in_flight", "done", "failed") if live else ("pending", "in_progress", "done", "failed")
    rows = []
    for host, states in hosts:
        total = sum(states.get(c, 0) for c in cols) or 1
        done, failed = states.get("done", 0), states.get("failed", 0)
        cells = "".join(f"<td class=n>{states.get(c, 0):,}</td>" for c in cols)
        rows.append(f'<tr><td>{escape(host)}</td>{cells}<td style="width:30%"><div class="bar">'
                    f'<i style="width:{100 * done / total:.1f}%;background:var(--ok)"></i>'
                    f'<i style="width:{100 * failed / total:.1f}%;background:var(--bad)"></i></div></td></tr>')
    head = "".join(f"<th class=n>{c.replace('_', ' ')}</th>" for c in cols)
    return (f'<table id="hosts"><tr><th>host</th>{head}<th>progress</th></tr>'
            f'{"".join(rows) or "<tr><td colspan=6 class=mute>no backfill queued</td></tr>"}</table>')


def _backfill(page: StatusPage) -> str:
    queue = page.report["backfill_queue"]
    q = " · ".join(f"{escape(k)} <b>{v:,}</b>" for k, v in queue.items()) or "empty"
    parked = ", ".join(escape(h) for h in page.parked) or "none"
    where = ("the backfill running in this daemon (its per-host gauges)" if page.hosts_kind == "live"
             else "the stored backfill queue, by the host known at enqueue")
    return (f'<section id="backfill"><h2>Backfill</h2><p>Queue: {q} · retrying repos <b>{page.timeline.retrying:,}</b>'
            f' · parked hosts (rate limits): <b id="parked-count">{len(page.parked)}</b> '
            f'<span id="parked">{parked}</span></p><p class="mute">Per host, from {where}.</p>'
            f'{_hosts(page.hosts, page.hosts_kind == "live")}</section>')


def _records(page: StatusPage) -> str:
    by = list(page.report["records"]["by_collection"].items())
    top = dict(by[:12])
    if len(by) > 12:
        top[f"{len(by) - 12} more collections"] = sum(v for _, v in by[12:])
    return f'<section id="records"><h2>Records by collection</h2>{_bars(top, {}, "collections")}</section>'


def render(page: StatusPage, *, refresh: int | None = None) -> str:
    """The page as HTML; `refresh`: seconds after which the browser reloads it (the daemon's page)."""
    r = page.report
    cursor = " / ".join(f"{c['seq']:,}" for c in r["cursors"]) or "none"
    sources = ", ".join(c["source"] for c in r["cursors"]) or "no firehose cursor stored"
    lag = r["lag_seconds"]
    running = r["consumer_running"]
    desync = r["repos"]["by_sync_state"].get("desynchronized", 0)
    tiles = "".join([
        _tile("consumer", "running" if running else "stopped", "consumer", "good" if running else "bad"),
        _tile(f"stored cursor (seq) of {sources}", escape(cursor), "cursor"),
        _tile("lag", "–" if lag is None else _dur(lag), "lag", "bad" if lag is not None and lag > 300 else ""),
        _tile("repos", _n(r["repos"]["total"]), "repos-total"),
        _tile("records", _n(r["records"]["total"]), "records-total"),
        _tile("desynchronized DIDs", _n(desync), "desynchronized", "bad" if desync else "good"),
        _tile("window covered", f"{100 * page.covered_fraction:.1f}%", "covered",
              "good" if not page.downtime else "bad"),
        _tile("downtime spans", _n(len(page.downtime)), "downtime-count"),
        _tile("repos backfilled in window", _n(page.timeline.repaired_ok), "repaired-ok"),
        _tile("backfills failed in window", _n(page.timeline.repaired_failed), "repaired-failed",
              "bad" if page.timeline.repaired_failed else ""),
        _tile("DIDs still to backfill", _n(page.to_repair_total), "to-repair",
              "good" if not page.to_repair_total else ""),
    ])
    since, until = page.since.strftime("%Y-%m-%dT%H:%M:%SZ"), page.until.strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        '<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
        f'<title>skyfill status</title><style>{_CSS}</style></head><body><header><h1>skyfill status</h1>'
        f'<span class="meta">{escape(page.source)} · generated {_t(page.generated_at)} '
        f'in {page.build_seconds:.1f} s</span>'
        f'<form method="get" action=""><label>since <input name="since" value="{since}"></label>'
        f'<label>until <input name="until" value="{until}"></label><button>show</button></form></header>'
        f'<main><div class="tiles">{tiles}</div>{_coverage(page)}{_ingest(page)}{_repos(page)}{_backfill(page)}'
        f'{_records(page)}</main></body></html>'
    )


async def page_html(store: Store, query: Mapping[str, str], *, source: str, history: IngestHistory | None = None,
                    refresh: int | None = None) -> str:
    """The page for the window `query` names (`since`, `until`; status_page.page_window), rendered."""
    since, until = page_window(query)
    return render(await build_page(store, since=since, until=until, source=source, history=history), refresh=refresh)


class CachedPages:
    """`page_html` for a daemon: one page built at a time, and a page reused for `ttl` seconds for
    the same query (at 10^7 records a page reads for seconds: a few open tabs reloading every
    `refresh` seconds must not keep the daemon's cores busy)."""

    def __init__(self, store: Store, *, source: str, history: IngestHistory | None, ttl: float = 15.0,
                 refresh: int | None = 30) -> None:
        self.store, self.source, self.history = store, source, history
        self.ttl, self.refresh = ttl, refresh
        self._lock = asyncio.Lock()
        self._pages: dict[tuple[tuple[str, str], ...], tuple[float, str]] = {}

    async def __call__(self, query: Mapping[str, str]) -> str:
        key = tuple(sorted(query.items()))
        async with self._lock:
            now = time.monotonic()
            self._pages = {k: v for k, v in self._pages.items() if now - v[0] < self.ttl}
            if key not in self._pages:
                html = await page_html(self.store, query, source=self.source, history=self.history,
                                       refresh=self.refresh)
                self._pages[key] = (time.monotonic(), html)
            return self._pages[key][1]
