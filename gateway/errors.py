"""Every error the gateway answers with, and how it reaches the client.

    GatewayError                      (status, OpenAI ``type``, ``code``)
    ├── InvalidRequest                400 invalid_request_error
    │   └── InvalidJSON               400 invalid_request_error / invalid_json
    ├── AuthenticationFailed          401 authentication_error / invalid_api_key
    ├── NotFound                      404 invalid_request_error / not_found
    │   └── ModelNotFound             404 invalid_request_error / model_not_found
    ├── PayloadTooLarge               413 invalid_request_error / payload_too_large
    ├── RateLimited                   429 rate_limit_exceeded / rate_limit_exceeded
    ├── UpstreamStatus                the upstream's own status and error body, passed through
    ├── UpstreamError                 502 upstream_error
    │   ├── UpstreamUnavailable       502 upstream_error / upstream_unavailable
    │   ├── UpstreamProtocolError     502 upstream_error / upstream_protocol_error
    │   └── UpstreamTimeout           504 upstream_error / upstream_timeout
    └── ServiceUnavailable            503 service_unavailable / service_unavailable
        └── NoBackendAvailable        503 service_unavailable / no_backend_available

Each one renders as OpenAI's ``{"error": {"message", "type", "param", "code"}}``, the shape the
``openai`` SDK reads into its exception classes. Foreign exceptions are translated in one place each:
:func:`upstream_errors` for httpx, :func:`render` for Litestar's own HTTP exceptions.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import httpx
import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from gateway.stores.base import StoreUnavailable
from gateway.wire import ErrorBody, ErrorDetail, encode

__all__ = [
    "AuthenticationFailed",
    "ClientGone",
    "GatewayError",
    "InvalidJSON",
    "InvalidRequest",
    "ModelNotFound",
    "NoBackendAvailable",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatus",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "error_response",
    "exception_handlers",
    "upstream_errors",
]

log = logging.getLogger("gateway")


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code  # type: ignore[misc]

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"

    MESSAGE = "Request body is larger than the gateway accepts ([server] max_body_size)."

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class ClientGone(GatewayError):
    """The client disconnected before its request's body had arrived. Nobody reads the answer; the
    status is what the access line and metrics report (nginx's convention)."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("The client disconnected before sending the whole request body.")


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class UpstreamStatus(GatewayError):
    """The upstream answered with an error status. The client gets that status and the upstream's
    error body, which is rewritten into OpenAI's shape only when it is not in it already (vLLM's older
    ``{"object": "error", ...}``, Ollama's ``{"error": "..."}``, a proxy's HTML page)."""

    def __init__(self, backend: str, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status  # type: ignore[misc]
        self.body = _openai_shaped(status, body)
        super().__init__(f"Backend `{backend}` answered {status}", headers=headers)


def _openai_shaped(status: int, body: bytes) -> bytes:
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return body
        message = error if isinstance(error, str) else payload.get("message") or payload.get("detail")
        if not isinstance(message, str):
            message = body.decode("utf-8", "replace")
    else:
        message = body.decode("utf-8", "replace").strip() or f"Upstream answered {status} with no body."
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    if status == 429:
        kind = "rate_limit_exceeded"
    return error_body(ErrorDetail(message=message[:2000], type=kind, code=str(status)))


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class NoBackendAvailable(ServiceUnavailable):
    code = "no_backend_available"


def error_body(detail: ErrorDetail) -> bytes:
    return encode(ErrorBody(error=detail))


class upstream_errors:
    """Translate httpx's exceptions, raised while talking to ``backend``, into gateway errors.

    A connect timeout is reported as unreachable rather than as a 504: the request never reached the
    model, as when the connection is refused. A class rather than a ``@contextmanager``: it wraps
    every upstream call, and a generator-based one costs several times as much to enter and leave.
    """

    __slots__ = ("_backend",)

    def __init__(self, backend: str) -> None:
        self._backend = backend

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if exc is None or not isinstance(exc, httpx.HTTPError):
            return
        backend = self._backend
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError)):
            raise UpstreamUnavailable(f"Backend `{backend}` is unreachable: {_describe(exc)}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise UpstreamTimeout(f"Backend `{backend}` timed out: {_describe(exc)}") from exc
        if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.NetworkError)):
            raise UpstreamUnavailable(f"Backend `{backend}` dropped the connection: {_describe(exc)}") from exc
        raise UpstreamProtocolError(f"Backend `{backend}` failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


_LITESTAR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


def render(exc: Exception, request_id: str | None) -> Response[bytes]:
    """The one place an exception becomes an HTTP response."""
    headers: dict[str, str] = {}
    if isinstance(exc, UpstreamStatus):
        headers.update(exc.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return Response(content=exc.body, status_code=exc.status, media_type=MediaType.JSON, headers=headers)
    if isinstance(exc, StoreUnavailable):
        exc = ServiceUnavailable(
            f"History is unavailable right now ({exc}); retry shortly.", code="history_unavailable"
        )
    if isinstance(exc, GatewayError):
        status, detail = exc.status, exc.detail()
        headers.update(exc.headers)
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        kind, code = _LITESTAR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else "Request failed"
        if status == 413:
            message = PayloadTooLarge.MESSAGE
        detail = ErrorDetail(message=message, type=kind, code=code)
        headers.update(exc.headers or {})
    else:
        # Anything else is a bug; its details stay in the log, the client gets a plain 500.
        log.exception("unhandled error", extra={"request_id": request_id})
        status = 500
        detail = ErrorDetail(message="The gateway failed to process the request.", type="server_error")
    if request_id:
        headers["x-request-id"] = request_id
    return Response(content=error_body(detail), status_code=status, media_type=MediaType.JSON, headers=headers)


def error_response(request: Request, exc: Exception) -> Response[bytes]:
    """The app's exception handler, for every exception."""
    request_id = request.scope.get("state", {}).get("request_id") or request.headers.get("x-request-id")
    return render(exc, request_id)


exception_handlers = {Exception: error_response}
