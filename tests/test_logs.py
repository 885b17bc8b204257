"""Logs: one access line per request with fixed fields, every line JSON in JSON mode, no secrets and
no message contents unless asked for."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.logs import JsonFormatter, TextFormatter, configure
from gateway.settings import BackendSettings, KeySettings, LoggingSettings, Settings
from tests.conftest import GatewayFactory, Upstream

ACCESS_FIELDS = {
    "request_id",
    "key",
    "tenant",
    "user",
    "model",
    "backend",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "duration_ms",
    "retries",
    "method",
    "path",
    "ts",
    "level",
    "msg",
}
SECRET = "sk-team-a-7c1e0f9b2d4a6e8f"
MARKER = "zebra-quartz-marmalade-4471"  # a message text that must not reach the log
CHAT = "/v1/chat/completions"


def test_access_lines_of_a_gateway_process_are_json_and_keep_secrets_out(
    upstream: Upstream, start_gateway: GatewayFactory
) -> None:
    gateway = start_gateway(
        f"""
[logging]
level = "${{LOG_LEVEL:-warning}}"
format = "json"

{upstream.backend_toml()}
[[keys]]
name = "team-a"
key = "{SECRET}"
tenant = "acme"
""",
        env={"LOG_LEVEL": "info"},
    )
    client = gateway.client(api_key=SECRET)
    messages = [{"role": "user", "content": f"please repeat {MARKER}"}]
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=3,
        user="alice",
    )
    completion = raw.parse()
    assert completion.usage is not None
    stream = client.chat.completions.create(
        model="fake-model",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    assert list(stream)
    assert httpx.get(f"{gateway.base_url}/models", trust_env=False).status_code == 401
    client.close()
    # SIGTERM: the clean stop (drain, then exit 0), whose lines are JSON too.
    assert gateway.stop(signal.SIGTERM) == 0

    lines = [line for line in gateway.log().splitlines() if line and not line.startswith("--- ")]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"ts", "level", "msg"} <= set(r) for r in records)
    assert any(r.get("logger", "").startswith("uvicorn") for r in records), "uvicorn's lines are JSON too"
    log_text = gateway.log()
    assert SECRET not in log_text
    assert MARKER not in log_text

    access = [r for r in records if "request_id" in r and "duration_ms" in r]
    chats = [r for r in access if r["path"] == CHAT]
    assert len(chats) == 2
    first, streamed = chats
    assert set(first) == ACCESS_FIELDS
    assert first["request_id"] == raw.headers["x-request-id"]
    assert first == first | {
        "key": "team-a",
        "tenant": "acme",
        "user": "alice",
        "model": "fake-model",
        "backend": "fake",
        "status": 200,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": 3,
        "retries": 0,
        "method": "POST",
        "level": "info",
    }
    assert first["msg"] == "POST /v1/chat/completions 200"
    assert 0 < first["ttft_ms"] <= first["duration_ms"]
    # A stream's line is written when it has ended: its usage came in the last chunk.
    assert streamed["completion_tokens"] == 4
    assert streamed["user"] is None
    (refused,) = [r for r in access if r["path"] == "/v1/models"]
    assert refused["status"] == 401
    assert refused["key"] is None


class AccessRecords:
    """The access lines logged during the test (caplog's records are per phase: read them late)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def __iter__(self) -> Iterator[logging.LogRecord]:
        return (r for r in self._caplog.records if r.name == "gateway.access")


@pytest.fixture
def access_records(caplog: pytest.LogCaptureFixture) -> AccessRecords:
    caplog.set_level(logging.DEBUG, logger="gateway.access")
    return AccessRecords(caplog)


def fields(records: AccessRecords, path: str) -> dict[str, Any]:
    (record,) = [r for r in records if r.fields["path"] == path]  # type: ignore[attr-defined]
    return record.fields  # type: ignore[attr-defined]


def app_settings(**overrides: Any) -> Settings:
    keys = [KeySettings(name="team-a", key=SECRET)]
    base = dict(backends=[BackendSettings(name="mock", kind="mock", models=["mock"])], keys=keys)
    return Settings(**(base | overrides))  # type: ignore[arg-type]


async def test_access_line_of_a_request(access_records: AccessRecords) -> None:
    async with AsyncTestClient(app=create_app(app_settings())) as client:
        body = {"model": "mock", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 2}
        response = await client.post(CHAT, json=body, headers={"authorization": f"Bearer {SECRET}", "x-user-id": "bob"})
        assert response.status_code == 200
    line = fields(access_records, CHAT)
    assert set(line) | {"ts", "level", "msg"} == ACCESS_FIELDS
    assert line["key"] == "team-a"
    assert line["user"] == "bob"
    assert line["completion_tokens"] == 2
    assert line["request_id"] == response.headers["x-request-id"]
    assert all(MARKER not in str(value) and SECRET not in str(value) for value in line.values())


async def test_log_bodies_adds_the_request_body_and_the_reply(access_records: AccessRecords) -> None:
    settings = app_settings(logging=LoggingSettings(log_bodies=True))
    async with AsyncTestClient(app=create_app(settings)) as client:
        body = {"model": "mock", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 2}
        assert (await client.post(CHAT, json=body, headers={"authorization": f"Bearer {SECRET}"})).status_code == 200
    line = fields(access_records, CHAT)
    assert MARKER in line["request_body"]
    assert line["reply"]["role"] == "assistant"
    assert line["reply"]["content"]


async def test_probes_are_logged_at_debug_and_errors_at_info(access_records: AccessRecords) -> None:
    async with AsyncTestClient(app=create_app(app_settings())) as client:
        await client.get("/health")
        await client.get("/nowhere")
    levels = {r.fields["path"]: r.levelno for r in access_records}  # type: ignore[attr-defined]
    assert levels == {"/health": logging.DEBUG, "/nowhere": logging.INFO}


def record(msg: str = "hello %s", *args: object, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


def test_json_formatter() -> None:
    formatter = JsonFormatter()
    plain = json.loads(formatter.format(record("hello %s", "there", request_id="r1")))
    assert plain["msg"] == "hello there"
    assert plain == plain | {"level": "warning", "logger": "gateway.test", "request_id": "r1"}
    assert plain["ts"].endswith("Z")
    structured = json.loads(formatter.format(record("GET / 200", fields={"status": 200, "key": None})))
    assert set(structured) == {"ts", "level", "msg", "status", "key"}
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("failed")
        failed.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exc"]


def test_text_formatter_quotes_what_could_split_a_line() -> None:
    line = TextFormatter().format(record("GET / 200", fields={"key": "team-a", "user": 'a b="c"\nd', "model": None}))
    assert line.endswith('GET / 200 key=team-a user="a b=\\"c\\"\\nd"')
    assert "\n" not in line


@pytest.mark.parametrize(("style", "tty", "expected"), [("auto", True, "text"), ("auto", False, "json")])
def test_auto_format_is_text_on_a_terminal_and_json_otherwise(style: str, tty: bool, expected: str) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        stream = Stream()
        configure(LoggingSettings(format=style, level="info"), stream)  # type: ignore[arg-type]
        logging.getLogger("uvicorn.error").info("Started server process")
        written = stream.getvalue().strip()
        if expected == "json":
            assert json.loads(written)["logger"] == "uvicorn.error"
        else:
            assert written.endswith("INFO uvicorn.error: Started server process")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
