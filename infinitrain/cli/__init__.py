"""The `infinitrain` command line."""

from .. import preemption

preemption.install()  # first, before the imports below take seconds: see preemption.py

from .app import app  # noqa: E402

__all__ = ["app"]
