"""Where the gateway's CPU goes: py-spy samples of the gateway process during a run, summarised.

``python -m tests.bench --profile`` records each gateway run with py-spy (not a project dependency:
``.venv/bin/pip install py-spy``) and writes, next to the JSON, the raw collapsed stacks and a summary
per point. Sampling pauses the gateway for each sample, so the figures of a profiled run are worse
than an unprofiled one's (the JSON says ``"profiled": true``).

The summary is by *self* time (the innermost frame of each sample), which stays right on an event
loop where a resumed coroutine's stack starts at the coroutine rather than at ``main``: per package,
per function, and, inclusively, for the gateway's own functions.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["find_py_spy", "record", "summarize"]

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?):(?P<line>\d+)\)$")
_RATE = 250


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(py_spy: str, pid: int, seconds: float, raw_path: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    # Blocking (py-spy pauses the process for each sample): with --nonblocking, samples taken while
    # the interpreter moves between frames come out as stacks that never ran, such as a logging call
    # inside a WeakSet callback calling a Prometheus counter.
    command += ["--rate", str(_RATE), "--format", "raw", "--output", str(raw_path)]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _package(path: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/")[0].removesuffix(".py") if marker == "site-packages/" else rest
    if "/lib/python3" in path:
        return "stdlib:" + path.rsplit("/lib/python3", 1)[1].split("/", 1)[-1]
    return path or "?"


def _module(path: str) -> str:
    package = _package(path)
    if package.startswith(("gateway/", "tests/", "stdlib:")):
        return package
    return package.split("/")[0]


def summarize(raw_path: Path, top: int = 20) -> str:
    self_by_package: collections.Counter[str] = collections.Counter()
    self_by_function: collections.Counter[str] = collections.Counter()
    gateway_inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = _FRAME.match(frames[-1])
        if leaf:
            short = leaf["path"].split("site-packages/")[-1].split("/work/main/")[-1]
            self_by_package[_module(leaf["path"])] += n
            self_by_function[f"{leaf['func']} ({short}:{leaf['line']})"] += n
        else:
            self_by_package["?"] += n
        seen = set()
        for frame in frames:
            match = _FRAME.match(frame)
            if match is None:
                continue
            path = match["path"]
            if path.startswith("gateway/") or "/gateway/" in path:
                name = f"{match['func']} (gateway/{path.rsplit('gateway/', 1)[1]})"
                if name not in seen:
                    seen.add(name)
                    gateway_inclusive[name] += n
    if not total:
        return f"{raw_path.name}: no samples"

    def block(title: str, counter: collections.Counter[str]) -> list[str]:
        return [title, *(f"  {100 * v / total:5.1f}%  {k}" for k, v in counter.most_common(top))]

    # A stdlib module's share is usually asyncio's Runner.run: time in uvloop's C code (epoll, socket
    # calls, callbacks), which py-spy attributes to the Python frame that started the loop.
    lines = [f"{total} samples at {_RATE} Hz (busy samples only)"]
    lines += block("self time by package (asyncio/runners = uvloop C code, syscalls):", self_by_package)
    lines += block("self time by function:", self_by_function)
    # Inclusive shares are lower bounds: a coroutine resumed by a callback from uvloop's C code has
    # a stack that starts at that coroutine, not at main().
    lines += block("gateway functions, inclusive (lower bounds: see profile.py):", gateway_inclusive)
    return "\n".join(lines)
