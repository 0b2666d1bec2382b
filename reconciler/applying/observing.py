"""Observing: every provider of a live run asked once, all at once, each as soon as what it
`needs` is seen, into one ObservedState.

Called by `applying.converging.converge` at the start of every round, by
`applying.connecting.Connection.observe` (the CLI's `observe` and live `plan`, the demo), and
by the tests. Every provider goes through the same steps, whatever its class: each is handed
the one `Observation` (the firewall reads each guest's rules as soon as the guest is found to
be ours, the agents' provider fills `health` from the guests seen), and adds its resources and
extra outputs to it. Observation is one concurrent graph, not provider after provider: the
Traefik instances, the Velocity bridge and the guests are read at once, and the firewall's
reads of a guest start while the other guests' configs are still being read (issue 16).

A provider's failure stops the observation unless it is `optional`: then the message goes to
`ObservedState.errors` under each of its kinds (under its class for one owning no kind), its
kinds are left out of `kinds` (so nothing of them is planned, nothing deleted), the plan warns,
and the rest of the platform converges.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

import anyio

from reconciler.model.errors import ConfigurationError, ProviderError
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.resources import Kind
from reconciler.providers import Observation, Provider


def observation_order(providers: Iterable[Provider]) -> list[Provider]:
    """Each provider once, after the providers of the kinds it `needs`, otherwise in the order
    given. A need nobody here provides is what the caller already knows (the edge poll's
    guests): it does not hold the provider back."""
    pending = list({id(p): p for p in providers}.values())
    provided = {k for p in pending for k in p.kinds}
    ordered: list[Provider] = []
    done: set[Kind] = set()
    while pending:
        ready = next((p for p in pending if not (p.needs & provided) - done - p.kinds), None)
        if ready is None:
            names = sorted(type(p).__name__ for p in pending)
            raise ConfigurationError("providers need each other's kinds: " + ", ".join(names))
        ordered.append(ready)
        done |= ready.kinds
        pending.remove(ready)
    return ordered


async def observe_all(
    providers: Iterable[Provider],
    platform: str,
    source: str = "",
    *,
    kinds: Iterable[Kind] | None = None,
    given: Iterable[ObservedResource] = (),
) -> ObservedState:
    """The providers of `kinds` (default: every kind of `providers`), and those owning no kind,
    all at once, each starting when the kinds it `needs` are done (or, for those it `streams`,
    taking them as they arrive), each handed what was seen. `given` is what the caller already
    knows (the edge poll's guests, with a fresh power state): seen first but not looked at, so
    its kinds are not in the state's `kinds` and nothing of them is planned. An optional
    provider's failure is recorded, not raised; any other stops the rest and is raised. The
    state lists the resources in `observation_order`, whatever order they were seen in."""
    registered = list(providers)
    provided = {k for p in registered for k in p.kinds}
    looked = set(provided) if kinds is None else set(kinds) & provided
    # A provider owning no kind (the agents' health) adds what the looked-at kinds are planned
    # by, so it serves every observation.
    asked = observation_order([p for p in registered if p.kinds & looked or not p.kinds])
    seen = Observation(list(given))
    seen.pending = {k for p in asked for k in p.kinds}
    found: dict[int, list[ObservedResource]] = {}
    errors: dict[str, str] = {}
    stopped: list[tuple[int, BaseException]] = []

    async def run(index: int, provider: Provider, scope: anyio.CancelScope) -> None:
        try:
            await seen.complete(provider.needs - provider.streams - provider.kinds)
            found[index] = await provider.observe(seen)
        except ProviderError as exc:
            if not provider.optional:
                stopped.append((index, exc))
                scope.cancel()
            for name in _names(provider):
                errors[name] = str(exc)
            looked.difference_update(provider.kinds)
        except Exception as exc:
            stopped.append((index, exc))
            scope.cancel()
        finally:
            seen.finish(provider.kinds, found.get(index, ()))

    async with anyio.create_task_group() as tg:
        for index, provider in enumerate(asked):
            tg.start_soon(run, index, provider, tg.cancel_scope)
    if stopped:
        raise min(stopped, key=lambda s: s[0])[1]
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return ObservedState(
        platform=platform,
        observed_at=now.replace("+00:00", "Z"),
        source=source,
        kinds=tuple(sorted(looked, key=lambda k: k.rank)),
        resources=(*given, *(r for i in sorted(found) for r in found[i])),
        health=seen.health,
        errors=errors,
        serving=seen.serving,
        cluster=seen.cluster,
        backups=seen.backups,
        backup_errors=seen.backup_errors,
    )


def _names(provider: Provider) -> list[str]:
    """What a failed provider's message is recorded under in `ObservedState.errors`: each of
    its kinds; a provider owning none, by its class, so the failure is still reported."""
    return [k.value for k in sorted(provider.kinds, key=lambda k: k.rank)] or [
        type(provider).__name__
    ]
