"""The `skyfill` command line: click only, no logic."""

from .main import main

__all__ = ["main"]
