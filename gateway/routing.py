"""Which backend serves a model: a pure function of the backends, the aliases and the model name.

Exact names win over patterns, longer patterns over shorter ones, so a ``*`` catch-all (the provider
convention's OpenAI backend) never shadows a model another backend serves by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.backends import Backend
from gateway.errors import ModelNotFound, NoBackendAvailable

__all__ = ["Route", "listed_models", "resolve"]


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    """The name the client asked for."""
    served: str
    """The name the backends serve it under (differs from ``model`` for an alias)."""
    backends: tuple[Backend, ...]
    """Candidates, best first."""

    @property
    def aliased(self) -> bool:
        return self.served != self.model


def resolve(model: str, backends: Sequence[Backend], aliases: Mapping[str, str]) -> Route:
    served = aliases.get(model, model)
    candidates = [b for b in backends if served in b.models]
    if not candidates:
        candidates = _by_pattern(served, backends)
    if not candidates:
        if model in aliases:
            raise NoBackendAvailable(
                f"The model `{model}` is an alias of `{served}`, which no backend serves right now.", param="model"
            )
        raise ModelNotFound(model)
    up = [b for b in candidates if b.up]
    if not up:
        names = ", ".join(f"{b.name} ({b.reason})" for b in candidates)
        raise NoBackendAvailable(f"No backend can serve `{model}` right now: {names}.", param="model")
    # Fewest requests in flight per unit of weight; ties keep configuration order.
    up.sort(key=lambda b: (b.in_flight + 1) / b.weight)
    return Route(model=model, served=served, backends=tuple(up))


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
