"""A real headless Chromium (the Debian package `chromium`) driven over the DevTools protocol.

    with Chromium() as browser:
        shot = browser.open("http://127.0.0.1:9100/", screenshot=Path("page.png"))
        shot.errors   # console errors, uncaught exceptions, failed loads (Log.entryAdded level error)
        shot.html     # the DOM after load (document.documentElement.outerHTML)
        shot.texts    # {element id: its innerText} for every element with an id

`ensure_chromium()` installs the package when `chromium` is absent (apt-get, as `make test` does),
so a fresh clone needs nothing by hand. Chromium runs with its own throwaway profile, no network
beyond the page (no background services, no QUIC), and is killed on exit.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

from .wait import poll

__all__ = ["Chromium", "Visit", "ensure_chromium", "ARTIFACTS"]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0")


def ensure_chromium() -> str:
    """The chromium binary; installs the Debian package first when it is missing."""
    found = shutil.which("chromium")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


@dataclass
class Visit:
    url: str
    errors: list[str] = field(default_factory=list)
    html: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    screenshot: Path | None = None


class Chromium:
    def __init__(self, *, width: int = 1100, height: int = 900) -> None:
        self.width, self.height = width, height
        self._profile = tempfile.TemporaryDirectory(prefix="skyfill-chromium-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws_url = ""
        self._log = Path(self._profile.name) / "stderr.log"

    def __enter__(self) -> Chromium:
        binary = ensure_chromium()
        with self._log.open("wb") as err:
            self._proc = subprocess.Popen(
                [binary, *_FLAGS, f"--user-data-dir={self._profile.name}/profile",
                 f"--window-size={self.width},{self.height}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=err,
            )

        def listening() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise AssertionError(f"chromium exited: {self._log.read_text(errors='replace')[-2000:]}")
            m = re.search(r"DevTools listening on (ws://\S+)", self._log.read_text(errors="replace"))
            if m:
                self._ws_url = m.group(1)
            return bool(m)

        poll(listening, timeout=60, what="chromium's DevTools endpoint")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._profile.cleanup()

    def open(self, url: str, *, screenshot: Path | None = None, timeout: float = 60) -> Visit:
        """Load `url` in a new tab, wait for its load event, collect errors, DOM and a full-page screenshot."""
        return asyncio.run(asyncio.wait_for(self._visit(url, screenshot), timeout))

    async def _visit(self, url: str, screenshot: Path | None) -> Visit:
        visit = Visit(url)
        ids = itertools.count(1)
        async with websockets.connect(self._ws_url, max_size=64 << 20) as ws:
            pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
            loaded = asyncio.Event()

            async def pump() -> None:
                async for raw in ws:
                    msg = json.loads(raw)
                    if "id" in msg and msg["id"] in pending:
                        pending.pop(msg["id"]).set_result(msg)
                        continue
                    method, params = msg.get("method"), msg.get("params", {})
                    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                        visit.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                                    for a in params.get("args", [])))
                    elif method == "Runtime.exceptionThrown":
                        visit.errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
                    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                        entry = params["entry"]
                        visit.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
                    elif method == "Page.loadEventFired":
                        loaded.set()

            async def call(method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
                n = next(ids)
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                pending[n] = fut
                msg: dict[str, Any] = {"id": n, "method": method, "params": params}
                if session:
                    msg["sessionId"] = session
                await ws.send(json.dumps(msg))
                reply = await fut
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

            reader = asyncio.create_task(pump())
            try:
                target = (await call("Target.createTarget", url="about:blank"))["targetId"]
                session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
                for domain in ("Page", "Runtime", "Log"):
                    await call(f"{domain}.enable", session)
                await call("Emulation.setDeviceMetricsOverride", session, width=self.width, height=self.height,
                           deviceScaleFactor=1, mobile=False)
                nav = await call("Page.navigate", session, url=url)
                if nav.get("errorText"):
                    visit.errors.append(f"navigate: {nav['errorText']}")
                await loaded.wait()
                await asyncio.sleep(0.3)  # late console messages of the load
                visit.html = (await call("Runtime.evaluate", session, returnByValue=True,
                                         expression="document.documentElement.outerHTML"))["result"]["value"]
                visit.texts = (await call("Runtime.evaluate", session, returnByValue=True, expression=(
                    "Object.fromEntries([...document.querySelectorAll('[id]')].map(e => [e.id, e.innerText]))"
                )))["result"]["value"]
                if screenshot is not None:
                    metrics = await call("Page.getLayoutMetrics", session)
                    size = metrics.get("cssContentSize") or metrics["contentSize"]
                    shot = await call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                                      clip={"x": 0, "y": 0, "width": self.width,
                                            "height": max(self.height, int(size["height"])), "scale": 1})
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                    visit.screenshot = screenshot
                await call("Target.closeTarget", targetId=target)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        return visit
