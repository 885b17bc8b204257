"""The httpx transport the gateway sends upstream requests through: HTTP/1.1 keep-alive connections
as asyncio protocols, responses parsed by httptools (the parser uvicorn serves with).

This is the hot path of every request and every streamed chunk, so it is written for it rather than
taken from a library (README, Performance, has the figures): httpx's own pool degrades under
concurrent streams, and httpx-aiohttp, fast under concurrency, spends about as much CPU adapting
between httpx and aiohttp as aiohttp spends sending the request. Here a request is one write of
bytes built from the ``httpx.Request``, and a response body is the parser's chunks handed to the
reader as they arrive. Callers keep httpx's API: ``httpx.AsyncClient(transport=Transport())``,
httpx's exceptions and timeouts (``connect``, ``read`` per read, ``pool``).

What it does not do, because no backend needs it: HTTP/2, proxies, HEAD requests, request bodies that
are not read into memory first (the gateway's are), and ``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from typing import Any

import httptools
import httpx

__all__ = ["DEFAULT_LIMITS", "FirstByteTimeout", "Transport", "find_header", "raw_headers"]

# Per connection, how much unread response body is buffered before reading from the upstream pauses
# (the client reading the relay is slower than the upstream writing it).
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_FOREVER = float("inf")
_EXTENSIONS = {"http_version": b"HTTP/1.1"}
# Far above what one process relays at once, so the pool never queues requests the upstreams could take.
DEFAULT_LIMITS = httpx.Limits(max_connections=8192, max_keepalive_connections=1024, keepalive_expiry=30)


class FirstByteTimeout(httpx.ReadTimeout):
    """A streamed response's headers and first body bytes did not come within ``Transport.send``'s
    ``total``."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one request at a time."""

    def __init__(self, pool: _Pool, key: tuple[bytes, str, int]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._total: float | None = None
        self._until: float | None = None
        self._waited_until: float | None = None
        self._until_body = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.received = False
        self.keep_alive = True
        self.closed = False
        self.error: httpx.TransportError | None = None
        self.idle_since = 0.0
        self.idle = False
        self.requests = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Each SSE event is its own small write: Nagle would hold it back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"The upstream sent an invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle:
            self._pool.forget(self)
        elif not self.complete and self.error is None:
            if not self.received:
                message = "The upstream closed the connection without sending a response."
                self._fail(httpx.RemoteProtocolError(message))
            elif self.headers_done and not self._framed():
                self.complete = True  # read-until-close framing: the end of the connection ends the body
            else:
                self._fail(httpx.ReadError("The upstream closed the connection before the response was complete."))
        self._wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._until_body:
            self._until_body = False
            self._until = None  # the answer has begun: from here on, only the read timeout
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        waiter = self._waiter  # _wake(), inline: this runs for every streamed event
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # the reader's side

    def begin(
        self, data: bytes, until: float | None = None, total: float | None = None, *, until_body: bool = False
    ) -> None:
        """Send one request on this connection (idle, or new); with ``until``, a loop time ``total``
        seconds after the request was first sent, every wait for its answer ends then at the latest
        (with ``until_body``, every wait until the first body bytes)."""
        self.requests += 1
        self._until = until
        self._total = total
        self._until_body = until_body and until is not None
        self.status = 0
        self.headers = []
        self.headers_done = self.complete = self.received = False
        # What the previous response left unread (its reader stopped at [DONE], or at an error): it
        # arrived whole, or the connection would not be back in the pool, but it is not this one's.
        self._chunks.clear()
        self._buffered = 0
        if self._paused:  # that unread rest had filled the buffer
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        self.transport.write(data)  # type: ignore[union-attr]

    async def wait(self, timeout: float | None) -> None:
        """Until the upstream sends something or closes; ``httpx.ReadTimeout`` after ``timeout`` s,
        or when the request's ``total`` (``begin()``) is up, whichever comes first."""
        if not await self.waiter(timeout):
            raise self.timed_out(timeout)

    def waiter(self, timeout: float | None) -> asyncio.Future[bool]:
        """What :meth:`wait` awaits: True when the upstream sends something or closes, False at the
        deadline (then raise :meth:`timed_out`). Awaited directly by a body's reads, which saves a
        coroutine for every streamed event."""
        loop = self._pool.loop
        self._waited_until = until = self._until
        self._waiter = waiter = loop.create_future()
        if timeout is not None or until is not None:
            deadline = loop.time() + timeout if timeout is not None else _FOREVER
            if until is not None and until < deadline:
                deadline = until
            self._deadline = deadline
            if self._timer is None or deadline < self._timer_at:
                # One timer outlives many waits, moved on only when it fires early: a timer set and
                # cancelled around every wait would cost more than the rest of a streamed chunk's read.
                # Set anew only for a deadline before it (a request with a shorter timeout).
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(deadline, self._expire)
                self._timer_at = deadline
        return waiter

    def timed_out(self, timeout: float | None) -> httpx.ReadTimeout:
        """The error for a waiter that came back False."""
        until = self._waited_until
        if until is not None and self._deadline == until:
            if self._until_body:
                return FirstByteTimeout(f"The upstream sent no body within {self._total:g} s.")
            return httpx.ReadTimeout(f"The upstream did not answer within {self._total:g} s.")
        return httpx.ReadTimeout(f"The upstream sent nothing for {timeout:g} s.")

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait sets a timer again
        if self._pool.loop.time() >= self._deadline:
            waiter.set_result(False)
        else:
            self._timer = self._pool.loop.call_at(self._deadline, self._expire)
            self._timer_at = self._deadline

    def take(self) -> bytes:
        """Every body byte buffered so far, as one piece."""
        chunks = self._chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def has_body(self) -> bool:
        return bool(self._chunks)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def _framed(self) -> bool:
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return False

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; closing it hands the connection back to the pool, or closes it
    when the body was not read to its end."""

    def __init__(self, connection: _Connection, read_timeout: float | None) -> None:
        self._connection = connection
        self._timeout = read_timeout
        self._released = False

    # An iterator of its own rather than an async generator, which the event loop registers and
    # finalises: about 7,000 instructions a stream.
    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        while True:
            if connection._chunks:  # has_body(), inline: asked twice for every streamed event
                return connection.take()
            if connection.complete:
                raise StopAsyncIteration
            if connection.error is not None:
                raise connection.error
            if not await connection.waiter(self._timeout):
                raise connection.timed_out(self._timeout)

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._connection._pool.release(self._connection)


class _Read(httpx.AsyncByteStream):
    """The stream of a response whose body is already read."""

    async def __aiter__(self) -> Any:
        return
        yield


_READ = _Read()


class _Response(httpx.Response):
    """The transport's ``httpx.Response``, whose ``headers`` are parsed the first time they are read.

    ``httpx.Response()`` parses every header into httpx's ``Headers`` at once: 13,500 instructions
    for a stream's three, two thirds of making the response, and the relay reads only the raw list
    (:func:`raw_headers`). The rest is ``httpx.Response.__init__``'s own assignments for a response
    given a stream; tests/test_transport.py holds them to the attributes httpx's own has."""

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], stream: httpx.AsyncByteStream) -> None:
        self.status_code = status_code
        self.raw_headers = headers
        self._headers: httpx.Headers | None = None
        self._request: httpx.Request | None = None
        self.next_request: httpx.Request | None = None
        self.extensions = {"http_version": b"HTTP/1.1"}
        self.history: list[httpx.Response] = []
        self.is_closed = False
        self.is_stream_consumed = False
        self.default_encoding = "utf-8"
        self.stream = stream
        self._num_bytes_downloaded = 0

    @property  # type: ignore[override]
    def headers(self) -> httpx.Headers:
        if self._headers is None:
            self._headers = httpx.Headers(self.raw_headers)
        return self._headers

    @headers.setter
    def headers(self, value: httpx.Headers) -> None:
        self._headers = httpx.Headers(value)
        self.raw_headers = self._headers.raw


def raw_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """A response's headers as the upstream sent them: over this transport, without parsing them."""
    return response.raw_headers if isinstance(response, _Response) else response.headers.raw


def find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase) in a raw list. httpx's ``headers.get()`` works
    out the encoding of every header first."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class _Pool:
    """Idle connections per origin, newest first, and a bound on how many are open at once."""

    def __init__(self, limits: httpx.Limits) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_connections = limits.max_connections
        self.max_idle = limits.max_keepalive_connections
        self.keepalive_expiry = limits.keepalive_expiry
        self.idle: dict[tuple[bytes, str, int], list[_Connection]] = {}
        self.idle_count = 0
        self.open = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed = False

    async def acquire(
        self, key: tuple[bytes, str, int], ssl_context: ssl.SSLContext | None, timeouts: dict[str, Any]
    ) -> _Connection:
        deadline: float | None = None
        while True:
            connection = self._idle_connection(key)
            if connection is not None:
                return connection
            if self.max_connections is not None and self.open >= self.max_connections and self.idle_count:
                self._discard(self._oldest_idle())  # an idle connection elsewhere gives up its slot
            if self.max_connections is None or self.open < self.max_connections:
                self.open += 1
                try:
                    return await self._connect(key, ssl_context, timeouts.get("connect"))
                except BaseException:
                    self._free_slot()
                    raise
            timeout = timeouts.get("pool")
            if deadline is None:
                deadline = self.loop.time() + timeout if timeout is not None else None
            await self._wait_for_change(timeout, deadline)

    def release(self, connection: _Connection) -> None:
        if connection.reusable() and not self.closed and (self.max_idle is None or self.idle_count < self.max_idle):
            connection.idle = True
            connection.idle_since = time.monotonic()
            self.idle.setdefault(connection.key, []).append(connection)
            self.idle_count += 1
            self._wake_one()
        else:
            self._discard(connection)

    def forget(self, connection: _Connection) -> None:
        """An idle connection the upstream closed."""
        idle = self.idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            self.idle_count -= 1
            connection.idle = False
            self._free_slot()

    def _idle_connection(self, key: tuple[bytes, str, int]) -> _Connection | None:
        idle = self.idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            self.idle_count -= 1
            connection.idle = False
            expired = self.keepalive_expiry is not None and now - connection.idle_since > self.keepalive_expiry
            if connection.closed or connection.transport.is_closing() or expired:  # type: ignore[union-attr]
                self._discard(connection)
                continue
            return connection
        return None

    def _oldest_idle(self) -> _Connection:
        connections = min((c for c in self.idle.values() if c), key=lambda c: c[0].idle_since)
        connection = connections.pop(0)
        self.idle_count -= 1
        connection.idle = False
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._free_slot()

    def _free_slot(self) -> None:
        self.open -= 1
        self._wake_one()

    async def _wait_for_change(self, timeout: float | None, deadline: float | None) -> None:
        """Until a connection is released or closed, at most until ``deadline``."""
        waiter = self.loop.create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter in self._queue:
                self._queue.remove(waiter)
            elif not waiter.cancelled():
                self._wake_one()  # woken as it gave up: the news is another waiter's
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"No upstream connection was free within {timeout:g} s.") from None
            raise

    def _wake_one(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(
        self, key: tuple[bytes, str, int], ssl_context: ssl.SSLContext | None, timeout: float | None
    ) -> _Connection:
        _, host, port = key
        try:
            async with asyncio.timeout(timeout):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self, key),
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"Connecting to {host}:{port} took longer than {timeout:g} s.") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"Connecting to {host}:{port} failed: {exc}") from exc
        return connection

    def close(self) -> None:
        self.closed = True
        for connections in self.idle.values():
            for connection in connections:
                connection.idle = False
                connection.close()
        self.idle.clear()
        self.idle_count = 0


class Transport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        limits: httpx.Limits = DEFAULT_LIMITS,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._limits = limits
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._pool: _Pool | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self._verify
            self._ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        return self._ssl

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r} in {url}.")
        if request.method == "HEAD":
            # The parser would wait for the body the headers announce; nothing here sends HEAD.
            raise httpx.UnsupportedProtocol("HEAD requests are not supported by this transport.")
        try:
            content = request.content
        except httpx.RequestNotRead:
            content = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path)]
        head += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
        head += [b"\r\n", content]
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        return await self.send(origin, b"".join(head), request.extensions.get("timeout", {}), request=request)

    async def send(
        self,
        origin: tuple[bytes, str, int],
        data: bytes,
        timeouts: dict[str, Any],
        *,
        read: bool = False,
        total: float | None = None,
        request: httpx.Request | None = None,
    ) -> httpx.Response:
        """Send ``data``, a whole HTTP/1.1 request, to ``origin`` (scheme, host, port), and answer
        with the response once its headers are in; with ``read``, once it is complete, its body read.
        ``total`` bounds the wait for that answer as the read timeout bounds each read: with ``read``,
        for the whole response; without, for its headers and first body bytes, then
        :class:`FirstByteTimeout` (a stream's first token). The deadline is the one the reads keep
        anyway, where a timer around the call would cost a timer set and cancelled."""
        pool = self._pool
        if pool is None:
            pool = self._pool = _Pool(self._limits)
        ssl_context = self._ssl_context() if origin[0] == b"https" else None
        read_timeout = timeouts.get("read")
        until = pool.loop.time() + total if total is not None else None
        while True:
            connection = await pool.acquire(origin, ssl_context, timeouts)
            reused = connection.requests > 0
            try:
                connection.begin(data, until, total, until_body=not read)
                while not (connection.complete if read else connection.headers_done):
                    if connection.error is not None:
                        raise connection.error
                    await connection.wait(read_timeout)
            except httpx.RemoteProtocolError:
                pool.release(connection)
                if reused and not connection.received:
                    continue  # the upstream had closed this idle connection as the request went out: retry on a new one
                raise
            except BaseException:
                pool.release(connection)  # not complete: closed, never reused
                raise
            break
        if read:
            content = connection.take() if connection.has_body() else b""
            pool.release(connection)
            headers = connection.headers
            if find_header(headers, b"content-encoding") is not None:
                response = httpx.Response(connection.status, headers=headers, content=content, extensions=_EXTENSIONS)
            else:
                response = _Response(connection.status, headers, _READ)
                # The body is whole and needs no decoding: httpx's read would pass it through its
                # decoder chain, a tenth of the call, to the same bytes.
                response._content = content
                # ... and the connection is back in the pool: aread() and aclose() have nothing to do.
                response.is_stream_consumed = response.is_closed = True
        else:
            response = _Response(connection.status, connection.headers, _Body(connection, read_timeout))
        if request is not None:
            response.request = request
        return response

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
