"""The gateway configurations the benchmark compares.

``bare``: one backend, no Redis, history off: the relay alone. ``realistic``: what a production
replica runs: history recorded for every chat in a real ``redis-server``. API keys and rate limits
do not exist yet; when they do, :func:`keys_and_limits` returns their TOML block and the realistic
figures include them with no other change.
"""

from __future__ import annotations

__all__ = ["KEYS_AND_LIMITS_NOTE", "bare", "keys_and_limits", "realistic"]

KEYS_AND_LIMITS_NOTE = "keys/limits: not available yet"


def keys_and_limits() -> str | None:
    """The TOML that turns on API keys and rate limits for the realistic run; None while the gateway
    has neither. The one place to change when they land."""
    return None


def _common(upstream_base_url: str) -> str:
    # Logging at warning: the gateway's own log lines are not what is measured.
    return f"""
[[backends]]
name = "bench"
kind = "openai"
base_url = "{upstream_base_url}"
models = ["bench-model"]

[logging]
level = "warning"
"""


def bare(upstream_base_url: str) -> str:
    return _common(upstream_base_url) + "\n[history]\nstore_all = false\n"


def realistic(upstream_base_url: str, redis_url: str) -> str:
    toml = _common(upstream_base_url) + f'\n[redis]\nurl = "{redis_url}"\n\n[history]\nstore_all = true\n'
    extra = keys_and_limits()
    return toml + ("\n" + extra if extra else "")
