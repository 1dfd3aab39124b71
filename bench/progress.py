"""What a bench run is doing, as it goes, on stderr (the results table goes to stdout at the end).

Every line is `[elapsed] message`, elapsed since the run began:
    part <name>: start                       when a part (or a size, a phase) begins
    part <name>: done in 12.3 s (8 rows)     when it ends (or `FAILED after ...`)
    part <name>: running 30 s; <step>        every `every` seconds inside a long part, naming its
                                             current step (`step("...")`, which also prints it)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["say", "step", "running", "set_every", "HEARTBEAT_EVERY"]

HEARTBEAT_EVERY = 30.0   # seconds between "running" lines inside a part

_began = time.monotonic()
_state: dict[str, float] = {"every": HEARTBEAT_EVERY}
_current: list[str] = []   # the step of the part running now (the heartbeat names it)


def set_every(seconds: float) -> None:
    """Seconds between the "running" lines of the parts started from now on."""
    _state["every"] = seconds


def say(msg: str) -> None:
    """One progress line on stderr, with the seconds since the run began."""
    print(f"[{time.monotonic() - _began:7.1f}s] {msg}", file=sys.stderr, flush=True)


def step(msg: str) -> None:
    """A part's step begins: print it; the heartbeat names it until the next one."""
    _current[:] = [msg]
    say(msg)


@contextmanager
def running(name: str) -> Iterator[None]:
    """`part <name>: start` now, `done in` / `FAILED after` at the end, and a `running` line
    every `set_every` seconds in between."""
    started = time.monotonic()
    stop = threading.Event()
    every = _state["every"]
    _current.clear()

    def beat() -> None:
        while not stop.wait(every):
            now = f"; {_current[0]}" if _current else ""
            took = time.monotonic() - started
            say(f"part {name}: running {took:.1f} s{now}" if took < 100 else f"part {name}: running {took:.0f} s{now}")

    say(f"part {name}: start")
    thread = threading.Thread(target=beat, name=f"bench-progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        say(f"part {name}: FAILED after {time.monotonic() - started:.1f} s")
        raise
    else:
        say(f"part {name}: done in {time.monotonic() - started:.1f} s")
    finally:
        stop.set()
        thread.join()
        _current.clear()
