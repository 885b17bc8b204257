"""The upstream transport (gateway/transport.py) against real sockets: servers that answer with
scripted bytes, so that framing, keep-alive, failures and timing can each be made to happen.

The end-to-end tests run every upstream call of the gateway through this transport too; these pin
down the cases a well-behaved upstream never produces."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.backends import Backend
from gateway.errors import UpstreamTimeout
from gateway.settings import BackendSettings
from gateway.transport import FirstByteTimeout, Transport, _Connection, _Pool, _Response, find_header, raw_headers
from gateway.upstream import open_response

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server on a free port whose connections are handled by ``handler``; counts them."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answer(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    lines = [b"HTTP/1.1 " + status, b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    transport = Transport()
    yield transport
    await transport.aclose()


@pytest.fixture
async def client(transport: Transport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        yield client


async def test_keep_alive_reuses_one_connection_and_sends_the_request_as_built(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(b'{"ok":true}', b"content-type: application/json"))

    async with Server(handler) as server:
        for n in range(3):
            response = await client.post(
                f"{server.url}/v1/chat/completions?x=1", content=b'{"n":%d}' % n, headers={"authorization": "Bearer k"}
            )
            assert response.status_code == 200
            assert response.json() == {"ok": True}
            assert response.headers["content-type"] == "application/json"
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        assert b"\r\nauthorization: Bearer k\r\n" in first
        assert b"\r\ncontent-length: 7\r\n" in first.lower()
        assert first.endswith(b'\r\n\r\n{"n":0}')


async def test_a_chunked_body_arrives_chunk_by_chunk_as_the_upstream_sends_it(transport: Transport) -> None:
    sent = asyncio.Event()
    proceed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n")
        writer.write(chunk(b"data: 1\n\n"))
        await writer.drain()
        sent.set()
        await proceed.wait()  # the second event is not written until the first was read
        writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")

    async with Server(handler) as server, httpx.AsyncClient(transport=transport) as client:
        async with client.stream("POST", f"{server.url}/v1/x", content=b"{}") as response:
            chunks = aiter(response.aiter_raw())
            assert await asyncio.wait_for(anext(chunks), 5) == b"data: 1\n\n"
            assert sent.is_set()
            proceed.set()
            assert [c async for c in chunks] == [b"data: 2\n\n"]


async def test_a_gzipped_answer_is_decoded_by_httpx(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(gzip.compress(b'{"data":[]}'), b"content-encoding: gzip"))

    async with Server(handler) as server:
        assert (await client.get(f"{server.url}/v1/models")).json() == {"data": []}


async def test_connection_close_and_a_body_read_until_close(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with Server(handler) as server:
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"all of it"
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"all of it"
        assert server.connections == 2


async def test_an_idle_connection_the_upstream_closed_is_replaced(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"one"))
        await writer.drain()  # then closes: keep-alive timed out on the upstream's side

    async with Server(handler) as server:
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"one"
        await asyncio.sleep(0.05)
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"one"
        assert server.connections == 2


async def test_a_stale_connection_closed_as_the_request_goes_out_is_retried_once(transport: Transport) -> None:
    # The upstream reads the second request on the kept-alive connection, then closes it without an
    # answer: the transport cannot know it was stale, so it retries on a new connection.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await server.read_request(reader)
            writer.write(answer(b"first"))
            await server.read_request(reader)
            return
        await server.read_request(reader)
        writer.write(answer(b"second"))
        await writer.drain()

    async with Server(handler) as server, httpx.AsyncClient(transport=transport) as client:
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"first"
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"second"
        assert server.connections == 2


async def test_a_new_connection_closed_without_an_answer_is_an_error_not_a_retry(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async with Server(handler) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.post(f"{server.url}/a", content=b"{}")
        assert server.connections == 1


async def test_a_body_cut_short_is_a_read_error_and_the_connection_is_not_reused(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async with Server(handler) as server:
        with pytest.raises(httpx.ReadError):
            await client.post(f"{server.url}/a", content=b"{}")
        with pytest.raises(httpx.ReadError):
            await client.post(f"{server.url}/a", content=b"{}")
        assert server.connections == 2


async def test_an_invalid_response_is_a_protocol_error(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await asyncio.sleep(1)

    async with Server(handler) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="invalid HTTP response"):
            await client.post(f"{server.url}/a", content=b"{}")


async def test_read_timeout_applies_to_each_read(transport: Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"a"))
        await writer.drain()
        await asyncio.sleep(0.15)
        writer.write(chunk(b"b"))  # within the read timeout of the previous read
        await writer.drain()
        await asyncio.sleep(5)

    timeout = httpx.Timeout(5, read=0.5)
    async with Server(handler) as server, httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        async with client.stream("POST", f"{server.url}/a", content=b"{}") as response:
            received = []
            with pytest.raises(httpx.ReadTimeout):
                async for piece in response.aiter_raw():
                    received.append(piece)
            assert received == [b"a", b"b"]


async def test_no_answer_within_the_read_timeout(transport: Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    async with Server(handler) as server, httpx.AsyncClient(transport=transport, timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{server.url}/a", content=b"{}")


def backend_at(server: Server, client: httpx.AsyncClient) -> Backend:
    settings = msgspec.convert(
        {"name": "b", "kind": "openai", "base_url": f"{server.url}/v1", "models": ["m"]}, BackendSettings
    )
    return Backend(settings, client)


@pytest.mark.parametrize("hooked", [False, True], ids=["bytes built", "httpx request"])
async def test_total_bounds_a_non_streamed_answer_that_keeps_trickling_in(hooked: bool) -> None:
    # Every read comes well within the read timeout; only the total can end the wait. Over the
    # gateway's transport the reads keep that deadline; with a request hook, a timer does.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(chunk(b" "))
            await writer.drain()
            await asyncio.sleep(0.05)

    async def hook(request: httpx.Request) -> None:
        pass

    hooks = {"request": [hook]} if hooked else {}
    async with Server(handler) as server, httpx.AsyncClient(transport=Transport(), event_hooks=hooks) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.3 s"):
            await asyncio.wait_for(
                open_response(
                    backend_at(server, client),
                    "/chat/completions",
                    b"{}",
                    request_id="r",
                    stream=False,
                    timeout=httpx.Timeout(5, read=1),
                    total=0.3,
                ),
                4,
            )
        assert loop.time() - started < 4  # the deadline ended it, not the server's 5 s of trickle


@pytest.mark.parametrize("headers_first", [True, False], ids=["headers at once", "nothing at all"])
async def test_total_bounds_a_stream_until_its_first_body_bytes(transport: Transport, headers_first: bool) -> None:
    # A model that accepted the request but never produces a token: headers (as vLLM sends them at
    # once) and then nothing, well within the read timeout each time; or nothing at all.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if headers_first:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await reader.read()

    async with Server(handler) as server:
        origin = (b"http", "127.0.0.1", server.port)
        request = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"

        async def first_bytes() -> bytes:
            response = await transport.send(origin, request, {"read": 30}, total=0.3)
            async for piece in response.stream:  # type: ignore[union-attr]
                return piece
            return b""

        with pytest.raises(FirstByteTimeout, match=r"sent no body within 0\.3 s"):
            await asyncio.wait_for(first_bytes(), 5)


async def test_total_no_longer_bounds_a_stream_once_its_body_has_begun(transport: Transport) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"first"))
        for piece in (b"a", b"b", b"c"):
            await asyncio.sleep(0.2)  # each within the read timeout, all past the total
            writer.write(chunk(piece))
        writer.write(b"0\r\n\r\n")
        await reader.read()

    async with Server(handler) as server:
        origin = (b"http", "127.0.0.1", server.port)
        request = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
        response = await transport.send(origin, request, {"read": 1}, total=0.3)
        pieces = [piece async for piece in response.stream]  # type: ignore[union-attr]
        await response.aclose()
        assert pieces == [b"first", b"a", b"b", b"c"]


async def test_a_shorter_deadline_on_a_reused_connection_is_kept(transport: Transport) -> None:
    # The first request leaves the connection's timer set 30 s ahead; the second's 0.3 s total
    # must not wait for it.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(0.05)
        writer.write(answer(b"first"))
        await server.read_request(reader)
        await reader.read()  # until the gateway gives up and closes the connection

    async with Server(handler) as server:
        origin = (b"http", "127.0.0.1", server.port)
        request = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
        first = await transport.send(origin, request, {"read": 30}, read=True)
        assert first.content == b"first"
        with pytest.raises(httpx.ReadTimeout, match=r"did not answer within 0\.3 s"):
            await asyncio.wait_for(transport.send(origin, request, {"read": 30}, read=True, total=0.3), 5)
        assert server.connections == 1


async def test_connection_refused_is_a_connect_error(client: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
        await client.get(f"http://127.0.0.1:{port}/")


async def test_an_unsupported_scheme_or_method_is_refused(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get("ftp://127.0.0.1/")
    with pytest.raises(httpx.UnsupportedProtocol, match="HEAD"):
        await client.head("http://127.0.0.1:9/")


async def test_the_pool_bounds_open_connections_and_times_out_waiting_for_one() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            await release.wait()
            writer.write(answer(b"ok"))

    transport = Transport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    async with Server(handler) as server, httpx.AsyncClient(transport=transport, timeout=5) as client:
        first = asyncio.create_task(client.post(f"{server.url}/a", content=b"{}"))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await client.post(f"{server.url}/a", content=b"{}", timeout=httpx.Timeout(5, pool=0.1))
        second = asyncio.create_task(client.post(f"{server.url}/a", content=b"{}"))
        await asyncio.sleep(0.05)
        assert not second.done()  # waiting for the one connection
        release.set()
        assert (await first).content == b"ok"
        assert (await second).content == b"ok"
        assert server.connections == 1


async def test_a_cancelled_request_frees_its_slot_and_its_connection_is_not_reused() -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            if b"slow" in request:
                arrived.set()
                await asyncio.sleep(5)
            writer.write(answer(b"ok"))

    transport = Transport(limits=httpx.Limits(max_connections=1))
    async with Server(handler) as server, httpx.AsyncClient(transport=transport, timeout=5) as client:
        slow = asyncio.create_task(client.post(f"{server.url}/a", content=b"slow"))
        await asyncio.wait_for(arrived.wait(), 5)  # sent, and waiting for its answer
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert (await client.post(f"{server.url}/a", content=b"{}")).content == b"ok"
        assert server.connections == 2


async def test_an_unread_stream_closed_early_closes_its_connection(client: httpx.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"part"))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"0\r\n\r\n")

    async with Server(handler) as server:
        async with client.stream("POST", f"{server.url}/a", content=b"{}") as response:
            assert await anext(aiter(response.aiter_raw())) == b"part"
        async with client.stream("POST", f"{server.url}/a", content=b"{}") as response:
            assert [c async for c in response.aiter_raw()] == [b"part"]
        assert server.connections == 2  # the first was abandoned mid-body


async def test_a_reader_slower_than_the_upstream_pauses_reading() -> None:
    # Unread, the body stops at the pause threshold plus what the sockets buffer, far short of all
    # of it; read, it arrives whole.
    total = 64 * 1024 * 1024
    written = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
            written += len(block)

    async with Server(handler) as server, httpx.AsyncClient(transport=Transport(), timeout=5) as client:
        async with client.stream("POST", f"{server.url}/a", content=b"{}") as response:
            await asyncio.sleep(0.5)
            assert 0 < written < total // 4
            received = 0
            async for piece in response.aiter_raw():
                received += len(piece)
            assert received == total


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_verifies_the_upstream_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"secret"))
        await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        trusting = Transport(verify=ssl.create_default_context(cafile=str(cert)))
        async with httpx.AsyncClient(transport=trusting, timeout=5) as client:
            assert (await client.get(f"https://localhost:{port}/")).content == b"secret"
        async with httpx.AsyncClient(transport=Transport(), timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://localhost:{port}/")
    finally:
        server.close()


async def test_open_response_sends_the_same_request_whether_it_builds_the_bytes_or_httpx_does() -> None:
    # Without request hooks the gateway writes the request's bytes itself; with one (tracing) it
    # builds an httpx.Request. The upstream must not be able to tell.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(b"{}"))

    async def hook(request: httpx.Request) -> None:
        pass

    def normalised(request: bytes) -> tuple[bytes, list[bytes], bytes]:
        head, body = request.split(b"\r\n\r\n", 1)
        line, *headers = head.split(b"\r\n")
        return line, sorted(h.lower() for h in headers), body

    async with Server(handler) as server:
        settings = msgspec.convert(
            {"name": "b", "kind": "openai", "base_url": f"{server.url}/v1", "api_key": "sk-up", "models": ["m"]},
            BackendSettings,
        )
        direct = httpx.AsyncClient(transport=Transport())
        hooked = httpx.AsyncClient(transport=Transport(), event_hooks={"request": [hook]})
        for client in (direct, hooked):
            for stream in (False, True):
                response = await open_response(
                    Backend(settings, client),
                    "/chat/completions",
                    b'{"model":"m"}',
                    request_id="rid-1",
                    stream=stream,
                    timeout=httpx.Timeout(5),
                )
                await response.aread()
                await response.aclose()
            await client.aclose()
    built, via_httpx = server.requests[:2], server.requests[2:]
    assert [normalised(r) for r in built] == [normalised(r) for r in via_httpx]
    line, headers, body = normalised(built[0])
    assert line == b"POST /v1/chat/completions HTTP/1.1"
    assert b"authorization: bearer sk-up" in headers
    assert b"x-request-id: rid-1" in headers
    assert b"content-length: 13" in headers
    assert body == b'{"model":"m"}'


async def test_a_read_answer_is_whole_and_decoded(transport: Transport) -> None:
    # send(read=True) hands back the body already read, as httpx would have decoded it.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            if b"gzip" in request:
                writer.write(answer(gzip.compress(b'{"zipped":true}'), b"content-encoding: gzip"))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"pla") + chunk(b"in"))
                writer.write(b"0\r\n\r\n")

    async with Server(handler) as server:
        origin = (b"http", "127.0.0.1", server.port)
        for body, expected in ((b"plain", b"plain"), (b"gzip", b'{"zipped":true}')):
            data = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            response = await transport.send(origin, data, {"read": 5}, read=True)
            assert response.content == expected
            assert await response.aread() == expected
            await response.aclose()
        assert server.connections == 1


def test_the_transports_response_has_the_attributes_httpx_gives_its_own() -> None:
    # _Response skips httpx.Response.__init__ to leave the headers unparsed: an attribute a newer
    # httpx sets there would be missing from it, and its methods would fail on it.
    stream = httpx.ByteStream(b"")
    made_by_httpx = set(vars(httpx.Response(200, headers=[(b"a", b"b")], stream=stream)))
    ours = _Response(200, [(b"a", b"b")], stream)
    assert set(vars(ours)) - {"raw_headers", "_headers"} == made_by_httpx - {"headers"}


async def test_the_transports_response_parses_its_headers_when_first_read() -> None:
    raw = [(b"Content-Type", b"application/json; charset=utf-8"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")]
    response = _Response(201, raw, httpx.ByteStream(b'{"ok": "\xc3\xa9"}'))
    assert raw_headers(response) is raw
    assert response._headers is None  # nothing parsed yet
    assert response.headers.raw == httpx.Headers(raw).raw
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert await response.aread() == b'{"ok": "\xc3\xa9"}'
    assert response.json() == {"ok": "\u00e9"}
    assert response.encoding == "utf-8"
    response.request = httpx.Request("POST", "http://upstream/v1")
    response.raise_for_status()
    response.headers = httpx.Headers({"x-new": "1"})
    assert raw_headers(response) == [(b"x-new", b"1")]
    # Any other response: its own parsed headers.
    assert raw_headers(httpx.Response(200, headers=raw)) == httpx.Headers(raw).raw


async def test_a_body_left_unread_does_not_leak_into_the_next_response(client: httpx.AsyncClient) -> None:
    # A relay stops reading at [DONE] or at an error, when the rest of the body may already be in:
    # the connection goes back to the pool, and what was left must not reach the next reader.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            await server.read_request(reader)
            n += 1
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"first of %d\n" % n))
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(chunk(b"rest of %d\n" % n) + b"0\r\n\r\n")

    async with Server(handler) as server:
        async with client.stream("POST", f"{server.url}/a", content=b"{}") as response:
            pieces = aiter(response.aiter_raw())
            assert await anext(pieces) == b"first of 1\n"
            await asyncio.sleep(0.1)  # the rest arrives, unread
        async with client.stream("POST", f"{server.url}/a", content=b"{}") as response:
            assert b"".join([p async for p in response.aiter_raw()]) == b"first of 2\nrest of 2\n"
        assert server.connections == 1


async def test_a_connection_reused_after_a_large_unread_answer_reads_again() -> None:
    # An answer that filled the buffer and completed in the same read leaves reading paused; the
    # next request on the connection must resume it, or its answer would never be read.
    class Socket:
        reading = True
        written = b""

        def get_extra_info(self, name: str) -> None:
            return None

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

        def write(self, data: bytes) -> None:
            self.written += data

    pool = _Pool(httpx.Limits())
    connection = _Connection(pool, (b"http", "upstream", 80))
    socket = Socket()
    connection.connection_made(socket)  # type: ignore[arg-type]
    connection.begin(b"GET / HTTP/1.1\r\n\r\n")
    big = b"x" * (1024 * 1024)
    connection.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big))
    assert connection.complete and connection.reusable() and not socket.reading
    connection.begin(b"GET /again HTTP/1.1\r\n\r\n")
    assert socket.reading and not connection.has_body()


def test_find_header_reads_the_first_value_of_a_name_in_any_case() -> None:
    raw = [(b"Content-Type", b"text/event-stream"), (b"X-A", b"1"), (b"x-a", b"2")]
    assert find_header(raw, b"content-type") == b"text/event-stream"
    assert find_header(raw, b"x-a") == b"1"
    assert find_header(raw, b"content-encoding") is None
