"""The gateway configurations the benchmark compares.

``bare``: one backend, no Redis, history off: the relay alone. ``realistic``: what a production
replica runs: history recorded for every chat in a real ``redis-server``, and an API key whose
rate limits are checked in Redis on every request (:func:`keys_and_limits`).
"""

from __future__ import annotations

from tests.bench.loadgen import BENCH_KEY

__all__ = ["KEYS_AND_LIMITS_NOTE", "bare", "keys_and_limits", "realistic"]

KEYS_AND_LIMITS_NOTE = "keys/limits: on (one key, limits far above the load, so admission runs but never refuses)"


def keys_and_limits() -> str | None:
    """The TOML that turns on API keys and rate limits for the realistic run: every request is
    authenticated, admitted by the Redis Lua script and settled, and none is refused."""
    return f"""
[[keys]]
name = "bench"
key = "{BENCH_KEY}"
rpm = 1000000000
tpm = 1000000000000
max_parallel = 100000
"""


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
