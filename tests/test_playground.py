"""End to end: the playground page (``GET /``) in headless Chromium against a gateway process.

The mock model echoes the last user message one word per `token_delay`, so a reply's final text is known
and its streaming is slow enough to watch.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser import Browser, Page, find_chromium
from tests.conftest import Gateway, GatewayFactory

CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip(
        "no Chromium on PATH (or $CHROMIUM) for the playground tests: apt-get install chromium",
        allow_module_level=True,
    )

ARTIFACTS = Path(__file__).parent / "artifacts"
CONFIG = """
[[backends]]
name = "mock"
kind = "mock"
models = ["mock"]
token_delay = 0.05
"""
ASSISTANT = ".msg.assistant"
MODEL_LISTED = "[...document.querySelectorAll('#model option')].some((o) => o.value === 'mock')"


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> Gateway:
    return start_gateway(CONFIG)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    assert CHROMIUM is not None
    browser = Browser(CHROMIUM, tmp_path / "chromium-profile")
    try:
        yield browser.start()
    finally:
        browser.close()


@pytest.fixture
def page(browser: Browser, gateway: Gateway) -> Iterator[Page]:
    page = browser.page()
    open_playground(page, gateway)
    yield page
    assert page.errors == [], "the page logged JavaScript errors"


def open_playground(page: Page, gateway: Gateway) -> None:
    page.goto(f"{gateway.url}/")
    page.wait_for(MODEL_LISTED)


def send(page: Page, text: str, *, enter: bool = False) -> None:
    page.type("#message", text)
    if enter:
        page.press_enter()
    else:
        page.click("#send")


def wait_reply(page: Page, expected: str, timeout: float = 10) -> None:
    """Wait until the last assistant message is `expected` and the page is ready for the next one."""
    page.wait_for(
        f"document.querySelector('#send').disabled === false"
        f" && [...document.querySelectorAll('{ASSISTANT}')].at(-1)?.textContent === {expected!r}",
        timeout,
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack("!II", data[16:24])
    return width, height


def test_reply_streams_token_by_token(page: Page) -> None:
    message = "hello playground streaming test"
    send(page, message)

    samples: list[str] = []
    deadline = time.monotonic() + 10
    while (text := page.text(ASSISTANT)) != message:
        assert time.monotonic() < deadline, f"the reply never completed: {samples}"
        if text and (not samples or samples[-1] != text):
            samples.append(text)
        time.sleep(0.01)
    partial = [s for s in samples if s != message]
    assert partial, "the reply appeared all at once, not token by token"
    assert all(message.startswith(s) for s in partial), samples
    assert page.text(".msg.user") == message
    wait_reply(page, message)

    data = page.screenshot(ARTIFACTS / "playground.png")
    width, height = png_size(data)
    assert (width, height) >= (800, 600)
    assert len(data) > 10_000, "the screenshot is suspiciously small (a blank page?)"


def test_stop_aborts_the_generation(page: Page, gateway: Gateway) -> None:
    message = " ".join(f"word{i}" for i in range(100))  # 100 tokens: 5 s at 0.05 s a token
    send(page, message)
    time.sleep(0.5)
    page.click("#stop")
    page.wait_for("document.querySelector('#send').disabled === false", timeout=2)

    stopped = page.text(ASSISTANT)
    time.sleep(0.5)
    assert page.text(ASSISTANT) == stopped, "the reply kept growing after Stop"
    assert stopped and message.startswith(stopped) and len(stopped) < len(message) / 2
    assert page.evaluate(f"document.querySelector('{ASSISTANT}').classList.contains('stopped')")
    assert page.evaluate("document.querySelector('#stop').disabled")

    # The page can chat again after a Stop.
    send(page, "after the stop", enter=True)
    wait_reply(page, "after the stop")


def test_conversation_is_kept_by_the_gateway(page: Page, gateway: Gateway) -> None:
    page.click("#new-conversation")
    conversation_id = page.wait_for("document.querySelector('#conversations li.active')?.dataset.id")

    send(page, "my name is Ada")
    wait_reply(page, "my name is Ada")
    send(page, "what is my name", enter=True)
    wait_reply(page, "what is my name")

    # History is written after the reply is sent, so it may lag a moment behind the page.
    url = f"{gateway.base_url}/conversations/{conversation_id}/items?order=asc"
    deadline = time.monotonic() + 5
    while len(items := httpx.get(url, trust_env=False).raise_for_status().json()["data"]) < 4:
        assert time.monotonic() < deadline, items
        time.sleep(0.05)
    turns = [(item["role"], item["content"][0]["text"]) for item in items]
    assert turns == [
        ("user", "my name is Ada"),
        ("assistant", "my name is Ada"),
        ("user", "what is my name"),
        ("assistant", "what is my name"),
    ]

    # A fresh page lists the conversation under its first message and loads its history on a click.
    page.goto(f"{gateway.url}/")
    selector = f"#conversations li[data-id='{conversation_id}']"
    page.wait_for(f"document.querySelector(\"{selector} .title\")?.textContent === 'my name is Ada'")
    page.click(f"{selector} button")
    page.wait_for("document.querySelectorAll('.msg').length === 4")
    texts = page.evaluate("[...document.querySelectorAll('.msg')].map((e) => [e.className, e.textContent])")
    assert texts == [
        ["msg user", "my name is Ada"],
        ["msg assistant", "my name is Ada"],
        ["msg user", "what is my name"],
        ["msg assistant", "what is my name"],
    ]

    # ...and continues it: only the new turn is sent, the gateway adds the rest.
    page.evaluate(
        "(() => { window.sent = []; const fetch = window.fetch;"
        " window.fetch = (url, init) => (window.sent.push([String(url), init?.body ?? null]), fetch(url, init)); })()"
    )
    send(page, "still there")
    wait_reply(page, "still there")
    sent = [(url, json.loads(body)) for url, body in page.evaluate("window.sent") if url.endswith("chat/completions")]
    assert [body for _, body in sent] == [
        {
            "model": "mock",
            "stream": True,
            "messages": [{"role": "user", "content": "still there"}],
            "conversation": conversation_id,
        }
    ]
    deadline = time.monotonic() + 5
    while len(httpx.get(url, trust_env=False).json()["data"]) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_api_key_is_sent_and_remembered(browser: Browser, start_gateway: GatewayFactory) -> None:
    key = "sk-playground-test-key"
    gateway = start_gateway(f'{CONFIG}\n[[keys]]\nname = "playground"\nkey = "{key}"\n')
    page = browser.page()
    page.goto(f"{gateway.url}/")
    error = page.wait_for("document.querySelector('.msg.error')?.textContent")
    assert error.startswith("Could not load the models: 401") and "API key" in error

    page.type("#api-key", key)
    page.click("#message")  # leaving the field commits it
    page.wait_for(MODEL_LISTED)
    assert page.evaluate("document.querySelectorAll('.msg.error').length") == 0
    send(page, "with a key")
    wait_reply(page, "with a key")

    open_playground(page, gateway)  # the key is remembered across visits
    assert page.evaluate("document.querySelector('#api-key').value") == key
    assert page.errors == []
