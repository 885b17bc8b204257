"""Real processes for the end-to-end tests: a redis-server, a fake upstream, the gateway.

Each process writes its stdout and stderr to a log file in the test's tmp dir. A failed startup raises
`StartupError` with the log's tail; when a test fails, the tails of the logs of the processes it used
are added to its report. Every process is started in its own session, and teardown kills the whole
group, so a test that fails half-way leaves nothing running.

Fixtures:

    redis_server      RedisServer, a fresh redis-server on a free port (or $REDIS_URL, see below)
    redis_url         its url
    upstream          Upstream serving `fake-model`, one per test
    upstream_module   Upstream serving `fake-model`, one per module, cleared before each test
    start_upstream    start_upstream(models=("fake-model",), name=None) -> Upstream, more of them
    start_gateway     start_gateway(config_toml, env=None) -> Gateway, all stopped at teardown
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

__all__ = [
    "Gateway",
    "GatewayFactory",
    "RedisServer",
    "SharedRedis",
    "StartupError",
    "Upstream",
    "UpstreamFactory",
    "free_port",
    "wait_http",
]

ROOT = Path(__file__).resolve().parent.parent
FAKE_UPSTREAM = Path(__file__).resolve().with_name("fake_upstream.py")
LOCALHOST = "127.0.0.1"


class StartupError(RuntimeError):
    """A process did not become ready; `returncode` is None if it is still running (and then killed)."""

    def __init__(self, message: str, returncode: int | None = None, log: str = "") -> None:
        super().__init__(f"{message}\n--- log tail ---\n{log}" if log else message)
        self.returncode = returncode
        self.log = log


def free_port() -> int:
    # The port is free when we look; another process may take it before ours binds, which is rare
    # enough on a test machine to accept.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def wait_http(
    url: str,
    timeout: float,
    *,
    status: int | None = None,
    process: subprocess.Popen[bytes] | None = None,
) -> httpx.Response:
    """Poll `url` with GET until it answers (with `status`, if given), or raise StartupError.

    Given the `process` that should be serving it, stop waiting as soon as that process exits.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if process is not None and process.poll() is not None:
            raise StartupError(f"process exited with {process.returncode} before {url} answered", process.returncode)
        try:
            # trust_env=False: a proxy from the environment must not sit between a test and 127.0.0.1.
            response = httpx.get(url, timeout=1.0, trust_env=False)
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if status is None or response.status_code == status:
                return response
            last = f"status {response.status_code}: {response.text[:200]}"
        if time.monotonic() > deadline:
            raise StartupError(f"{url} did not answer{f' {status}' if status else ''} within {timeout}s ({last})")
        time.sleep(0.05)


class _Process:
    """A child process in its own session, logging to `log_path` (appended to across restarts)."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            log.write(f"--- {shlex.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )

    def _wait_ready(self, ready: Callable[[], None]) -> None:
        """Run `ready` (which raises StartupError when it gives up); on failure kill and report the log."""
        try:
            ready()
        except StartupError as exc:
            returncode = self.process.poll() if self.process else None
            self.kill()
            raise StartupError(f"{self.name}: {exc.args[0]}", returncode, self.log_tail()) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Send `sig`, wait up to `timeout` seconds, then SIGKILL; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        return process.returncode

    def kill(self) -> None:
        if self.process is None:
            return
        self._kill_group()
        self.process.wait()

    def _kill_group(self) -> None:
        # The session's group outlives its leader if the leader forked workers.
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class RedisServer(_Process):
    """A redis-server on a free port, without persistence, that a test may stop and start again."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        super().__init__("redis", log_dir)
        self.port = port or free_port()
        self._dir = log_dir
        self.url = f"redis://{LOCALHOST}:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        self._spawn(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", LOCALHOST,
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--dir", str(self._dir),
            ]
        )  # fmt: skip
        self._wait_ready(lambda: self._wait_ping(timeout))
        return self

    def _wait_ping(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise StartupError(f"exited with {self.process.returncode}")
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise StartupError(f"no PONG within {timeout}s") from None
                time.sleep(0.02)

    def flush(self) -> None:
        with redis.Redis.from_url(self.url) as client:
            client.flushdb()


class SharedRedis:
    """A Redis given by $REDIS_URL (a CI service, say); it cannot be stopped, so fault tests skip."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stop(self, *args: Any, **kwargs: Any) -> None:
        pytest.skip("REDIS_URL is set: faults cannot be injected into a shared Redis")

    def start(self, *args: Any, **kwargs: Any) -> None:
        pytest.skip("REDIS_URL is set: faults cannot be injected into a shared Redis")

    def flush(self) -> None:
        with redis.Redis.from_url(self.url) as client:
            client.flushdb()


class Upstream(_Process):
    """tests/fake_upstream.py as a process, and its control endpoints."""

    def __init__(
        self,
        log_dir: Path,
        *,
        models: Sequence[str] = ("fake-model",),
        name: str = "fake",
        port: int | None = None,
    ) -> None:
        super().__init__(f"upstream-{name}", log_dir)
        self.models = list(models)
        self.upstream_name = name
        self.port = port or free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.base_url = f"{self.url}/v1"

    def backend_toml(self, name: str = "fake", models: Sequence[str] = ("fake-model",)) -> str:
        """A gateway config's ``[[backends]]`` entry for this upstream, served as vLLM."""
        listed = ", ".join(f'"{model}"' for model in models)
        return f'[[backends]]\nname = "{name}"\nkind = "vllm"\nbase_url = "{self.base_url}"\nmodels = [{listed}]\n'

    def start(self, timeout: float = 10) -> Upstream:
        command = [sys.executable, str(FAKE_UPSTREAM), "--host", LOCALHOST, "--port", str(self.port)]
        command += ["--models", ",".join(self.models), "--name", self.upstream_name]
        self._spawn(command)
        self._wait_ready(lambda: wait_http(f"{self.url}/health", timeout, status=200, process=self.process))
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 2) -> int | None:
        # Short: uvicorn's graceful shutdown waits for in-flight requests, and a `hang` never ends.
        return super().stop(sig, timeout)

    def _control(self, method: str, path: str) -> Any:
        response = httpx.request(method, f"{self.url}/_control/{path}", timeout=5, trust_env=False)
        response.raise_for_status()
        return response.json()

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every request received, oldest first: method, path, headers, body_b64, body. With ``path``,
        those to that path only: a gateway's health checks and model discovery reach the fake too,
        whenever their interval comes round."""
        received = self._control("GET", "requests")
        return received if path is None else [r for r in received if r["path"] == path]

    def events(self) -> list[dict[str, Any]]:
        """Response events, oldest first: type (started/completed/disconnect), request_id, path."""
        return self._control("GET", "events")

    def clear(self) -> None:
        self._control("DELETE", "requests")

    def wait_event(self, type: str, request_id: str | None = None, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            for event in events:
                if event["type"] == type and (request_id is None or event["request_id"] == request_id):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {type!r} event for request {request_id!r} within {timeout}s: {events}")
            time.sleep(0.02)


class Gateway(_Process):
    """The gateway as a real process: `python -m gateway serve --config ...`."""

    def __init__(
        self,
        config_path: Path,
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        name: str = "gateway",
    ) -> None:
        super().__init__(name, log_dir)
        self.config_path = config_path
        self.port = port or free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.base_url = f"{self.url}/v1"
        # Unbuffered, so the log is complete when a test reads it before the process exits.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def start(self, timeout: float = 20) -> Gateway:
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)]
        command += ["--host", LOCALHOST, "--port", str(self.port)]
        self._spawn(command, self.env)
        self._wait_ready(lambda: wait_http(f"{self.url}/health", timeout, status=200, process=self.process))
        return self

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10) -> int:
        """SIGINT by default: it stops at once, where SIGTERM first drains for [shutdown] drain_delay."""
        returncode = super().stop(sig, timeout)
        if returncode is None:
            raise RuntimeError(f"{self.name} was never started")
        return returncode

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "sk-test")
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "sk-test")
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, **kwargs)


class UpstreamFactory:
    """What the `start_upstream` fixture yields: `start_upstream(models=..., name=...) -> Upstream`."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self.started: list[Upstream] = []

    def __call__(self, models: Sequence[str] = ("fake-model",), name: str | None = None) -> Upstream:
        upstream = Upstream(self._tmp_path, models=models, name=name or f"fake-{len(self.started)}")
        self.started.append(upstream)
        return upstream.start()

    def stop_all(self) -> None:
        for upstream in reversed(self.started):
            upstream.stop()


class GatewayFactory:
    """What the `start_gateway` fixture yields: `start_gateway(config_toml, env=None) -> Gateway`."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self.started: list[Gateway] = []

    def __call__(self, config_toml: str, env: Mapping[str, str] | None = None, **kwargs: Any) -> Gateway:
        name = f"gateway-{len(self.started)}"
        config_path = self._tmp_path / f"{name}.toml"
        config_path.write_text(config_toml)
        gateway = Gateway(config_path, self._tmp_path, env=env, name=name, **kwargs)
        self.started.append(gateway)  # before start(), so a failed start is torn down too
        return gateway.start()

    def stop_all(self) -> None:
        for gateway in reversed(self.started):
            if gateway.process is not None:
                gateway.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer | SharedRedis]:
    """A fresh, empty redis-server on a free port, stopped at teardown.

    With $REDIS_URL set, the Redis there instead, flushed (its database only) before the test; its
    `stop()` and `start()` skip the test, since faults cannot be injected into a shared server.
    """
    yield from _redis(tmp_path)


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | SharedRedis]:
    """One redis-server for the module (or $REDIS_URL's, as `redis_server`)."""
    yield from _redis(tmp_path_factory.mktemp("redis"))


def _redis(log_dir: Path) -> Iterator[RedisServer | SharedRedis]:
    shared = os.environ.get("REDIS_URL")
    if shared:
        server = SharedRedis(shared)
        server.flush()
        yield server
        return
    server = RedisServer(log_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@contextlib.contextmanager
def replicas(config_toml: str, directory: Path) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway processes with one config (two replicas sharing its Redis), both stopped after."""
    path = directory / "gateway.toml"
    path.write_text(config_toml)
    first = Gateway(path, directory, name="replica-1")
    second = Gateway(path, directory, name="replica-2")
    try:
        yield first.start(), second.start()
    finally:
        for gateway in (first, second):
            if gateway.process is not None:
                gateway.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer | SharedRedis) -> str:
    return redis_server.url


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    server = Upstream(tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def upstream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(tmp_path_factory.mktemp("upstream"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def upstream_module(upstream_server: Upstream) -> Upstream:
    """One fake upstream per module; cleared before each test, and restarted if a test stopped it."""
    if not upstream_server.running:
        upstream_server.start()
    upstream_server.clear()
    return upstream_server


@pytest.fixture
def start_upstream(tmp_path: Path) -> Iterator[UpstreamFactory]:
    """Extra fake upstreams (for routing and fallback), each named for `owned_by` and its log."""
    factory = UpstreamFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call" and report.failed:
        for name, process in _processes(item):
            report.sections.append((f"log of {name} (tail)", process.log_tail()))
    return report


def _processes(item: pytest.Item) -> list[tuple[str, _Process]]:
    found: dict[int, _Process] = {}  # by id: upstream_module and its module fixture are one process
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, _Process):
            found[id(value)] = value
        elif isinstance(value, GatewayFactory | UpstreamFactory):
            found.update((id(p), p) for p in value.started)
    return [(p.name, p) for p in found.values()]
