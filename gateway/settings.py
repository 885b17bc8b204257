"""Configuration: a TOML file decoded straight into Structs, or the environment.

``config/gateway.toml`` documents every key. Strings may use ``${VAR}`` or ``${VAR:-default}``, so
secrets stay in the environment. Nothing is read at import time: :func:`load` is called by the CLI, and
tests build :class:`Settings` directly.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "AuthSettings",
    "BackendSettings",
    "ConfigError",
    "DiscoverySettings",
    "GuardSettings",
    "HealthSettings",
    "HistorySettings",
    "KeySettings",
    "LimitsSettings",
    "LoggingSettings",
    "ModelSettings",
    "RedisSettings",
    "ResumableSettings",
    "RetrySettings",
    "ServerSettings",
    "Settings",
    "ShutdownSettings",
    "TimeoutOverrides",
    "TimeoutSettings",
    "from_env",
    "load",
    "load_file",
]

Seconds = Annotated[float, Meta(gt=0)]
BackendKind = Literal["vllm", "ollama", "openai", "mock"]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section.

    ``forbid_unknown_fields``: a misspelt key must fail loudly instead of silently keeping a default.
    ``kw_only``: sections are built by name in tests and by :func:`from_env`, never positionally.
    """


class ServerSettings(Config):
    host: str = "0.0.0.0"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8000
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    cors_origins: list[str] = []
    # Requests carry whole conversations and base64 images; 32 MiB leaves room for both.
    max_body_size: Annotated[int, Meta(ge=1024)] = 32 * 1024 * 1024


class RedisSettings(Config):
    url: str | None = None


class TimeoutSettings(Config):
    """Seconds. ``first_token`` bounds the wait for a stream's first event and ``idle`` the gap between
    two reads; a non-streamed reply arrives whole, so only ``total`` bounds it."""

    connect: Seconds = 10.0
    first_token: Seconds = 120.0
    idle: Seconds = 120.0
    total: Seconds = 600.0


class TimeoutOverrides(Config):
    """A backend's own timeouts; a key left out takes the [timeouts] value."""

    connect: Seconds | None = None
    first_token: Seconds | None = None
    idle: Seconds | None = None
    total: Seconds | None = None

    def over(self, defaults: TimeoutSettings) -> TimeoutSettings:
        return TimeoutSettings(
            connect=self.connect or defaults.connect,
            first_token=self.first_token or defaults.first_token,
            idle=self.idle or defaults.idle,
            total=self.total or defaults.total,
        )


class BackendSettings(Config):
    name: Annotated[str, Meta(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    kind: BackendKind
    base_url: str | None = None
    api_key: str | None = None
    # None: discover from GET {base_url}/models. Entries with * ? [ are patterns that route but are not
    # listed by /v1/models (the provider convention routes "gemini*" to Gemini, say).
    models: list[str] | None = None
    weight: Annotated[float, Meta(gt=0)] = 1.0
    # mock only: seconds between two streamed tokens, to look like a real model.
    token_delay: Annotated[float, Meta(ge=0)] = 0.0
    timeouts: TimeoutOverrides | None = None


class ModelSettings(Config):
    """Routing of one public model name beyond its backends: what to try when they all fail."""

    name: Annotated[str, Meta(min_length=1)]
    # Other model names, or backend names (the same model on that backend), tried in order.
    fallbacks: list[str] = []


class RetrySettings(Config):
    # Attempts per request, the first included, across backends and fallbacks; only while no byte
    # has reached the client.
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    # First backoff in seconds, doubled each attempt, jittered, capped by max_backoff.
    backoff: Annotated[float, Meta(ge=0)] = 0.1
    max_backoff: Annotated[float, Meta(ge=0)] = 2.0


class ShutdownSettings(Config):
    # After SIGTERM: seconds of still accepting requests while /ready answers 503, so load balancers
    # stop sending before the listener closes ...
    drain_delay: Annotated[float, Meta(ge=0)] = 5.0
    # ... then seconds in-flight requests (streams) get to finish before they are cut.
    grace_period: Annotated[float, Meta(ge=0)] = 30.0


class ResumableSettings(Config):
    # Make every streamed chat resumable, not only those with `conversation`, `background: true` or
    # the X-Resumable: true header.
    always: bool = False
    # Events kept per stream (older ones are trimmed), and seconds a stream stays readable.
    max_events: Annotated[int, Meta(ge=16)] = 10_000
    ttl: Seconds = 3600.0


class GuardSettings(Config):
    # Stop a stream whose text repeats one n-gram of this many words `repeats` times in a row
    # (a degenerate loop); 0 turns the guard off.
    repeated_ngram: Annotated[int, Meta(ge=0, le=64)] = 0
    repeats: Annotated[int, Meta(ge=2, le=1000)] = 8


class DiscoverySettings(Config):
    # Seconds between two refreshes of the models of backends that have no `models` list.
    interval: Seconds = 60.0


class HistorySettings(Config):
    # Record every chat completion, not only those sent with `store: true`.
    store_all: bool = True
    # Days a record, conversation or item is kept after its last write. 0 keeps them forever.
    ttl_days: Annotated[float, Meta(ge=0)] = 30.0
    # Server-side memory: at most this many non-system items of a conversation are sent (0: no cap) ...
    max_messages: Annotated[int, Meta(ge=0)] = 50
    # ... and at most about this many tokens of them (0: no cap). System messages always go.
    max_tokens: Annotated[int, Meta(ge=0)] = 0
    # Items kept per conversation; the oldest go first.
    max_items: Annotated[int, Meta(ge=1)] = 1000
    # Records waiting while Redis is down; past this the oldest are dropped (and counted).
    queue_size: Annotated[int, Meta(ge=1)] = 10_000


class HealthSettings(Config):
    # Take this replica out of rotation (503 on /ready) while Redis is unreachable.
    require_redis: bool = False
    # Consecutive failures (connect errors, 5xx, timeouts) that take a backend out of rotation ...
    failure_threshold: Annotated[int, Meta(ge=1)] = 3
    # ... for this many seconds, after which one trial request may bring it back.
    cooldown: Seconds = 30.0
    # Seconds between two active health checks of each backend.
    interval: Seconds = 10.0


class AuthSettings(Config):
    # Holder of this key manages virtual keys (/admin) and may use every model, unlimited.
    master_key: str | None = None


class KeySettings(Config):
    """A static API key. Give the secret as `key` (usually "${ENV_VAR}") or only its SHA-256 as
    `key_sha256`, so the config never holds it."""

    name: Annotated[str, Meta(min_length=1)]
    key: str | None = None
    key_sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")] | None = None
    tenant: Annotated[str, Meta(min_length=1)] = "default"
    # Globs of the models this key may use.
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    # Requests and tokens (prompt + completion) per minute, requests at once; 0 = unlimited.
    rpm: Annotated[int, Meta(ge=0)] = 0
    tpm: Annotated[int, Meta(ge=0)] = 0
    max_parallel: Annotated[int, Meta(ge=0)] = 0


class LimitsSettings(Config):
    # What admission does while Redis is unreachable: admit against a per-process limiter
    # ("fail_open"), or refuse with 503 ("fail_closed").
    on_redis_error: Literal["fail_open", "fail_closed"] = "fail_open"
    # Completion tokens reserved for a request that sets no max_tokens.
    default_max_tokens: Annotated[int, Meta(ge=1)] = 1024
    # The rate window in seconds: limits are per minute at 60.
    window: Seconds = 60.0


class LoggingSettings(Config):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # "json": one JSON object per line; "text": lines for a person; "auto": text when stderr is a
    # terminal, JSON otherwise.
    format: Literal["auto", "json", "text"] = "auto"
    # Add request bodies and reply messages to the access lines. They hold what users wrote.
    log_bodies: bool = False


class Settings(Config):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    backends: list[BackendSettings] = msgspec.field(default_factory=list)
    models: list[ModelSettings] = msgspec.field(default_factory=list)
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    retries: RetrySettings = msgspec.field(default_factory=RetrySettings)
    shutdown: ShutdownSettings = msgspec.field(default_factory=ShutdownSettings)
    guard: GuardSettings = msgspec.field(default_factory=GuardSettings)
    resumable: ResumableSettings = msgspec.field(default_factory=ResumableSettings)
    timeouts: TimeoutSettings = msgspec.field(default_factory=TimeoutSettings)
    discovery: DiscoverySettings = msgspec.field(default_factory=DiscoverySettings)
    history: HistorySettings = msgspec.field(default_factory=HistorySettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    keys: list[KeySettings] = msgspec.field(default_factory=list)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the source, the key and the fix."""


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> tuple[Settings, str]:
    """Settings from ``path``, else from the file named by ``GATEWAY_CONFIG``, else from the
    environment. Returns the settings and a description of where they came from."""
    env = os.environ if environ is None else environ
    path = path or env.get("GATEWAY_CONFIG") or None
    if path:
        return load_file(path, env), str(path)
    return from_env(env), "environment"


def load_file(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    raw = _interpolate(raw, env, source, "")
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(source, exc)) from exc
    _check(settings, source)
    return settings


# The provider convention: API key and base URL per provider, requests routed by model-name prefix.
_PROVIDERS = (
    ("GEMINI", "gemini", "https://generativelanguage.googleapis.com/v1beta/openai", ["gemini*"]),
    ("ANTHROPIC", "anthropic", "https://api.anthropic.com/v1", ["claude*"]),
    ("OPENAI", "openai", "https://api.openai.com/v1", ["*"]),
)


def from_env(environ: Mapping[str, str]) -> Settings:
    """Settings for a single backend from the environment of the service this gateway replaces
    (``LLM_BASE_URL``, ``LLM_MODEL``, ``LLM_API_KEY``, ``REDIS_URL``, ``APP_PORT``, ``LOG_LEVEL``), plus
    ``OPENAI_*``, ``GEMINI_*`` and ``ANTHROPIC_*``. With none of them, the built-in mock backend."""
    source = "environment"
    backends: list[BackendSettings] = []
    if base_url := environ.get("LLM_BASE_URL"):
        model = environ.get("LLM_MODEL")
        backends.append(
            BackendSettings(
                name="llm",
                kind="openai",
                base_url=base_url,
                api_key=environ.get("LLM_API_KEY") or None,
                models=[model] if model else None,
            )
        )
    for prefix, name, default_url, patterns in _PROVIDERS:
        if key := environ.get(f"{prefix}_API_KEY"):
            url = environ.get(f"{prefix}_BASE_URL") or default_url
            backends.append(BackendSettings(name=name, kind="openai", base_url=url, api_key=key, models=patterns))
    if not backends:
        backends.append(BackendSettings(name="mock", kind="mock", models=["mock"]))

    raw: dict[str, Any] = {}
    if port := environ.get("APP_PORT"):
        raw.setdefault("server", {})["port"] = _env_int(port, "APP_PORT")
    if host := environ.get("APP_HOST"):
        raw.setdefault("server", {})["host"] = host
    if url := environ.get("REDIS_URL"):
        raw["redis"] = {"url": url}
    if level := environ.get("LOG_LEVEL"):
        raw["logging"] = {"level": level.lower()}
    if master := environ.get("GATEWAY_MASTER_KEY"):
        raw["auth"] = {"master_key": master}
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(source, exc, env_names=_ENV_NAMES)) from exc
    settings.backends = backends
    _check(settings, source)
    return settings


_ENV_NAMES = {
    "server.port": "APP_PORT",
    "server.host": "APP_HOST",
    "redis.url": "REDIS_URL",
    "logging.level": "LOG_LEVEL",
}


def _env_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment: {name}={value!r} is not a port number; set it to e.g. 8000") from None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], source: str, key: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{source}: key `{key}` uses ${{{name}}}, but the environment variable {name} is not set. "
                f"Set it, or give a default with ${{{name}:-value}}."
            )

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, source, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, source, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def _explain(source: str, exc: msgspec.ValidationError, env_names: Mapping[str, str] | None = None) -> str:
    """Turn msgspec's ``Expected `int`, got `str` - at `$.server.port``` into a sentence that names
    the key and what to do."""
    match = _AT.match(str(exc))
    assert match is not None
    what, path = match.group("what"), (match.group("path") or "").lstrip(".")
    if unknown := _UNKNOWN.match(what):
        field = unknown.group(1)
        section = path or "top level"
        known = ", ".join(_known_keys(path))
        return (
            f"{source}: unknown key `{field}` in [{section}]. Known keys there: {known}. "
            "Check the spelling against config/gateway.toml."
        )
    if env_names and path in env_names:
        return f"{source}: {env_names[path]}: {what[0].lower()}{what[1:]}."
    where = f"key `{path}`" if path else "the file"
    return f"{source}: {where}: {what[0].lower()}{what[1:]}. See config/gateway.toml for what it takes."


def _known_keys(path: str) -> list[str]:
    struct: Any = Settings
    for part in re.findall(r"[A-Za-z_]+", path):
        fields = {f.name: f.type for f in msgspec.structs.fields(struct)}
        struct = fields.get(part, struct)
        if getattr(struct, "__origin__", None) is list:
            struct = struct.__args__[0]
        members = getattr(struct, "__args__", ())
        struct = next((t for t in members if isinstance(t, type) and issubclass(t, Config)), struct)
    return [f.name for f in msgspec.structs.fields(struct)]


def _check(settings: Settings, source: str) -> None:
    """What the types cannot say."""
    if not settings.backends:
        raise ConfigError(
            f'{source}: no [[backends]] are configured. Add one, e.g.\n  [[backends]]\n  name = "mock"\n  kind = "mock"'
        )
    seen: set[str] = set()
    for i, backend in enumerate(settings.backends):
        key = f"backends[{i}]"
        if backend.name in seen:
            raise ConfigError(
                f"{source}: key `{key}.name`: the backend name `{backend.name}` is used twice; names must be unique."
            )
        seen.add(backend.name)
        if backend.kind == "mock":
            continue
        if not backend.base_url:
            raise ConfigError(
                f"{source}: key `{key}.base_url` is missing for backend `{backend.name}` (kind {backend.kind}). "
                "Set it to the server's OpenAI-compatible URL, including /v1, e.g. http://localhost:8000/v1."
            )
        if not re.match(r"^https?://[^/\s]+", backend.base_url):
            raise ConfigError(
                f"{source}: key `{key}.base_url` = {backend.base_url!r} is not an http(s) URL; "
                "write it as the OpenAI SDK's base_url, e.g. http://localhost:8000/v1."
            )
        if backend.token_delay:
            raise ConfigError(f'{source}: key `{key}.token_delay` applies to kind "mock" only; remove it.')
    names: set[str] = set()
    for i, key in enumerate(settings.keys):
        if (key.key is None) == (key.key_sha256 is None):
            raise ConfigError(
                f"{source}: key `keys[{i}]` ({key.name}) needs exactly one of `key` (the secret, e.g. "
                '"${TEAM_KEY}") or `key_sha256` (its SHA-256 in hex).'
            )
        if key.key is not None and len(key.key) < 8:
            raise ConfigError(f"{source}: key `keys[{i}].key` is shorter than 8 characters; use a long random secret.")
        if key.name in names:
            raise ConfigError(f"{source}: key `keys[{i}].name`: `{key.name}` is used twice; names must be unique.")
        names.add(key.name)
    for alias, target in settings.aliases.items():
        if alias == target:
            raise ConfigError(f"{source}: key `aliases.{alias}` points at itself; remove it.")
    if settings.redis.url and not re.match(r"^(redis|rediss|unix)://", settings.redis.url):
        raise ConfigError(
            f"{source}: key `redis.url` must be a redis:// , rediss:// or unix:// URL, e.g. redis://localhost:6379/0."
        )


def redact_url(url: str) -> str:
    """A URL fit for logs and ``check-config``: the password replaced."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
