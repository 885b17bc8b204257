"""What is measured: the points of a full and of a quick run.

Each point is one load-generator run against the upstream directly and one through the gateway, with
the same arguments, one after the other.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

__all__ = ["GROUPS", "Point", "plan", "select"]

GROUPS = ("non-stream", "stream", "stream-delay", "open-streams", "realistic", "reference")

# 5 ms between tokens: a fast model as a user sees it (200 tokens/s per stream).
TOKEN_DELAY = 0.005
# The open-streams point: streams slow enough to be all open at once (20 tokens 200 ms apart: 4 s).
OPEN_STREAMS = 1000
OPEN_TOKENS = 20
OPEN_DELAY = 0.2


@dataclass(frozen=True)
class Point:
    group: str
    concurrency: int
    stream: bool = False
    max_tokens: int = 64
    token_delay: float = 0.0
    requests: int | None = None
    """A fixed number of requests instead of a duration (the open-streams point)."""
    config: str = "bare"
    direct_from: str | None = None
    """Reuse that point's direct figures instead of measuring them again."""

    @property
    def name(self) -> str:
        kind = "stream" if self.stream else "non-stream"
        if self.group == "stream-delay":
            return f"stream {self.token_delay * 1000:g}ms c={self.concurrency}"
        if self.group == "open-streams":
            return f"open streams {self.concurrency}"
        if self.group == "realistic":
            return f"realistic {kind} c={self.concurrency}"
        if self.group == "reference":
            pace = f" {self.token_delay * 1000:g}ms" if self.token_delay else ""
            return f"reference {self.config.removeprefix('reference-')} {kind}{pace} c={self.concurrency}"
        return f"{kind} c={self.concurrency}"

    def loadgen_args(self) -> list[str]:
        args = ["--concurrency", str(self.concurrency)]
        if self.requests is not None:
            args += ["--requests", str(self.requests)]
        if self.stream:
            args += ["--stream", "--max-tokens", str(self.max_tokens)]
            if self.token_delay:
                args += ["--token-delay", str(self.token_delay)]
        return args


def plan(quick: bool) -> list[Point]:
    non_stream = (1, 64) if quick else (1, 16, 64, 256)
    stream = (64,) if quick else (1, 64, 512)
    delayed = (64, 256) if quick else (64, 256, 512)
    points = [Point("non-stream", c) for c in non_stream]
    points += [Point("stream", c, stream=True) for c in stream]
    points += [Point("stream-delay", c, stream=True, token_delay=TOKEN_DELAY) for c in delayed]
    points.append(
        Point(
            "open-streams",
            OPEN_STREAMS,
            stream=True,
            max_tokens=OPEN_TOKENS,
            token_delay=OPEN_DELAY,
            requests=OPEN_STREAMS,
        )
    )
    points.append(Point("realistic", 64, config="realistic", direct_from="non-stream c=64"))
    points.append(Point("realistic", 64, stream=True, config="realistic", direct_from="stream c=64"))
    if not quick:
        for relay in ("reference-litestar", "reference-litestar-asgi", "reference-asgi"):
            for c in (1, 64):
                points.append(Point("reference", c, config=relay, direct_from=f"non-stream c={c}"))
            for c in (64, 256):
                paced = Point("reference", c, stream=True, token_delay=TOKEN_DELAY, config=relay)
                points.append(dataclasses.replace(paced, direct_from=f"stream 5ms c={c}"))
    return points


def select(points: list[Point], only: str | None) -> list[Point]:
    """``only``: comma-separated group names (``non-stream``, ``realistic``...) or point-name patterns
    (``"stream 5ms c=*"``, ``"non-stream c=64"``)."""
    if not only:
        return points
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [p for p in points if any(pat == p.group or fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
