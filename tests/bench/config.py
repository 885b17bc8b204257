"""The gateway configurations the benchmark compares.

``bare``: one backend, no Redis, history off: the relay alone. ``realistic``: what a production
replica runs: history recorded for every chat in a real ``redis-server``, and an API key whose
rate limits are checked in Redis on every request (:func:`keys_and_limits`).
"""

from __future__ import annotations

from collections.abc import Collection

from tests.bench.loadgen import BENCH_KEY

__all__ = ["KEYS_AND_LIMITS_NOTE", "PARTS", "bare", "keys_and_limits", "realistic"]

KEYS_AND_LIMITS_NOTE = "keys/limits: on (one key, limits far above the load, so admission runs but never refuses)"


def keys_and_limits(*, limits: bool = True) -> str | None:
    """The TOML that turns on API keys and rate limits for the realistic run: every request is
    authenticated, admitted by the Redis Lua script and settled, and none is refused. Without
    ``limits``, the key alone."""
    rates = "rpm = 1000000000\ntpm = 1000000000000\nmax_parallel = 100000\n" if limits else ""
    return f"""
[[keys]]
name = "bench"
key = "{BENCH_KEY}"
{rates}"""


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


PARTS = ("keys", "limits", "history")
"""What the realistic configuration adds to the bare one; ``without`` leaves some out (limits go with
keys), to see what each costs."""


def realistic(upstream_base_url: str, redis_url: str, without: Collection[str] = ()) -> str:
    history = "false" if "history" in without else "true"
    toml = _common(upstream_base_url) + f'\n[redis]\nurl = "{redis_url}"\n\n[history]\nstore_all = {history}\n'
    extra = None if "keys" in without else keys_and_limits(limits="limits" not in without)
    return toml + ("\n" + extra if extra else "")
