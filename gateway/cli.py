"""``gateway serve`` and ``gateway check-config``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import msgspec

from gateway.settings import ConfigError, Settings, load, load_file, redact_url

__all__ = ["main", "worker_app"]

# How settings reach worker processes when --workers > 1: uvicorn imports the app by name in each
# worker, so the parent hands over what it resolved (and validated) instead of re-reading sources.
_SETTINGS_ENV = "GATEWAY_RESOLVED_SETTINGS"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="An OpenAI-compatible LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG, else the environment)")
    serve.add_argument("--host", help="address to listen on (overrides [server] host)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides [server] port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides [server] workers)")
    check = commands.add_parser("check-config", help="validate a config file and print what it resolves to")
    check.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            settings = load_file(args.file)
            print(describe(settings, args.file))
            return 0
        settings, source = load(args.config)
        settings = _override(settings, host=args.host, port=args.port, workers=args.workers, source=source)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return _serve(settings, source)


def _override(settings: Settings, *, host: str | None, port: int | None, workers: int | None, source: str) -> Settings:
    changes = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None}
    if not changes:
        return settings
    try:
        server = msgspec.convert(msgspec.structs.asdict(settings.server) | changes, type(settings.server))
    except msgspec.ValidationError as exc:
        raise ConfigError(f"command line: {exc}") from None
    return msgspec.structs.replace(settings, server=server)


def _serve(settings: Settings, source: str) -> int:
    import uvicorn

    level = settings.logging.level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: a line per request is the access log's job.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    log = logging.getLogger("gateway")
    log.info("configuration from %s", source)
    for line in describe(settings, source).splitlines()[1:]:
        log.info("%s", line)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler that was
    # installed before it ran; exiting 0 there tells Kubernetes (and compose) the stop was clean.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = settings.server
    options = dict(
        host=server.host,
        port=server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=level,
        proxy_headers=False,
        server_header=False,
    )
    if server.workers > 1:
        os.environ[_SETTINGS_ENV] = msgspec.json.encode(settings).decode()
        uvicorn.run("gateway.cli:worker_app", factory=True, workers=server.workers, **options)  # type: ignore[arg-type]
    else:
        from gateway.app import create_app

        uvicorn.run(create_app(settings), **options)  # type: ignore[arg-type]
    return 0


def worker_app() -> object:
    from gateway.app import create_app

    return create_app(msgspec.json.decode(os.environ[_SETTINGS_ENV], type=Settings))


def describe(settings: Settings, source: str) -> str:
    """What a config resolves to, secrets left out."""
    server = settings.server
    lines = [
        f"{source}: OK",
        f"server: {server.host}:{server.port}, {server.workers} worker(s), max body {server.max_body_size} bytes, "
        f"CORS origins: {', '.join(server.cors_origins) or 'none'}",
        f"redis: {redact_url(settings.redis.url) if settings.redis.url else 'none (history kept in memory)'}",
        "backends:",
    ]
    for backend in settings.backends:
        where = "built-in" if backend.kind == "mock" else backend.base_url
        key = "api key set" if backend.api_key else "no api key"
        models = (
            ", ".join(backend.models)
            if backend.models is not None
            else ("mock" if backend.kind == "mock" else f"discovered from {where}/models")
        )
        lines.append(f"  {backend.name}: kind={backend.kind} url={where} {key} weight={backend.weight:g}")
        lines.append(f"    models: {models}")
    if settings.aliases:
        lines.append("aliases:")
        lines.extend(f"  {alias} -> {target}" for alias, target in settings.aliases.items())
    t = settings.timeouts
    lines.append(
        f"timeouts: connect {t.connect:g}s, first token {t.first_token:g}s, idle {t.idle:g}s, total {t.total:g}s"
    )
    return "\n".join(lines)
