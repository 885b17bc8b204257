"""Which backend serves a model: a pure function of the backends, the aliases and the model name.

Exact names win over patterns, longer patterns over shorter ones, so a ``*`` catch-all (the provider
convention's OpenAI backend) never shadows a model another backend serves by name.
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.backends import Backend
from gateway.errors import ModelNotFound, NoBackendAvailable

__all__ = ["Route", "Target", "listed_models", "resolve"]


@dataclass(frozen=True, slots=True)
class Target:
    backend: Backend
    served: str
    """The model name this backend is asked for."""


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    """The name the client asked for."""
    served: str
    """The name the first choice serves it under (differs from ``model`` for an alias)."""
    targets: tuple[Target, ...]
    """What to try, in order: the model's backends, best first, then its fallbacks."""

    @property
    def aliased(self) -> bool:
        return self.served != self.model

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(target.backend for target in self.targets)


def resolve(
    model: str,
    backends: Sequence[Backend],
    aliases: Mapping[str, str],
    fallbacks: Mapping[str, Sequence[str]] | None = None,
    now: float | None = None,
) -> Route:
    """The route of ``model``. Raises :class:`ModelNotFound` for a model nothing serves or falls back
    for, and :class:`NoBackendAvailable` when it is known but every backend that could serve it is
    down or ejected."""
    now = time.monotonic() if now is None else now
    served = aliases.get(model, model)
    candidates = _serving(served, backends)
    fallback_names = (fallbacks or {}).get(model, ())
    if not candidates and not fallback_names:
        if model in aliases:
            raise NoBackendAvailable(
                f"The model `{model}` is an alias of `{served}`, which no backend serves right now.", param="model"
            )
        raise ModelNotFound(model)
    available = [b for b in candidates if b.available(now)]
    if len(available) > 1:
        # Fewest requests in flight per unit of weight. The random part breaks ties (and spreads
        # sequential traffic) in proportion to weight; it never outweighs one request in flight.
        available.sort(key=lambda b: (b.in_flight + random.random()) / b.weight)
    targets = [Target(b, served) for b in available]
    for name in fallback_names:
        by_name = next((b for b in backends if b.name == name), None)
        if by_name is not None:
            extra = [Target(by_name, served)] if by_name.available(now) else []
        else:
            fallback_served = aliases.get(name, name)
            extra = [Target(b, fallback_served) for b in _serving(fallback_served, backends) if b.available(now)]
        targets.extend(t for t in extra if t not in targets)
    if not targets:
        names = ", ".join(f"{b.name} ({b.reason or b.state})" for b in candidates) or "its fallbacks are unavailable"
        raise NoBackendAvailable(f"No backend can serve `{model}` right now: {names}.", param="model")
    return Route(model=model, served=served, targets=tuple(targets))


def _serving(model: str, backends: Sequence[Backend]) -> list[Backend]:
    exact = [b for b in backends if model in b.models]
    return exact or _by_pattern(model, backends)


def _by_pattern(model: str, backends: Sequence[Backend]) -> list[Backend]:
    best: list[Backend] = []
    best_length = -1
    for backend in backends:
        for pattern in backend.patterns:
            if fnmatch.fnmatchcase(model, pattern):
                if len(pattern) > best_length:
                    best, best_length = [backend], len(pattern)
                elif len(pattern) == best_length:
                    best.append(backend)
                break
    return best


def listed_models(backends: Sequence[Backend], aliases: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(model id, owned_by)`` for ``/v1/models``: every served name, then every alias, owned by the
    backend that serves its target. Patterns route but cannot be listed."""
    owners: dict[str, str] = {}
    for backend in backends:
        for name in sorted(backend.models):
            owners.setdefault(name, backend.name)
    listed = list(owners.items())
    for alias, target in aliases.items():
        if alias in owners:
            continue
        if target in owners:
            listed.append((alias, owners[target]))
        elif matched := _by_pattern(target, backends):
            listed.append((alias, matched[0].name))
    return listed
