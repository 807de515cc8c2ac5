"""The error recovery raises when a tier cannot rebuild the state (the message says why and what to fall back to)."""

from __future__ import annotations


class RecoveryError(RuntimeError):
    """Recovery is impossible at this tier (the message says why and what to fall back to)."""
