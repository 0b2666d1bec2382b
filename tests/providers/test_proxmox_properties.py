"""The invariant that matters most, on fakepve through the real client: whatever is done out of
band to a converged platform (memory, cores, tags, power, a guest deleted, a foreign guest
added), one converge brings it back; after it a fresh plan is empty, the next converge writes
nothing, every desired guest exists exactly once, and foreign guests are left as they were.

One fakepve serves every example: it is converged once, and each example starts from the
converged state the previous one restored (its foreign guests removed again).
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.applying.converging import Convergence, converge
from reconciler.applying.observing import observe_all
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, connect
from tests.fakepve_fixtures import mutating_calls, no_sleep

_MARK = re.compile(r"^reconciler:v1 platform=zpack address=(\S+)", re.MULTILINE)

GUESTS = [
    "guest/mc-lobby",
    "guest/mc-survival",
    "guest/mc-rlcraft",
    "guest/dev-bob",
    "guest/velocity",
    "guest/zpack-db",
    "guest/metrics-store",
]

Op = tuple[Any, ...]
OPS: st.SearchStrategy[list[Op]] = st.lists(
    st.one_of(
        st.tuples(st.just("memory"), st.sampled_from(GUESTS), st.sampled_from([512, 1024, 3072])),
        st.tuples(st.just("cores"), st.sampled_from(GUESTS), st.integers(1, 8)),
        st.tuples(
            st.just("tags"),
            st.sampled_from(GUESTS),
            st.frozensets(st.sampled_from(["zpack", "game", "extra", "Ops"]), max_size=3),
        ),
        st.tuples(st.just("stop"), st.sampled_from(GUESTS)),
        st.tuples(st.just("delete"), st.sampled_from(GUESTS)),
        # Outside the explicit vmids: a foreign guest there is a plan error, tested elsewhere.
        st.tuples(st.just("foreign"), st.integers(1004, 1010), st.booleans()),
    ),
    min_size=1,
    max_size=4,
)


def run(graph: DesiredGraph, provider: ProxmoxProvider) -> Convergence:
    return anyio.run(lambda: converge(graph, [provider]))


def where(provider: ProxmoxProvider) -> dict[str, list[tuple[str, int]]]:
    """Address -> [(node, vmid)] of the guests carrying our mark for it."""
    out: dict[str, list[tuple[str, int]]] = {}
    for item in provider.client.cluster.resources.get(type="vm"):
        kind = "qemu" if item["type"] == "qemu" else "lxc"  # the bastion VM and its template
        cfg = provider.client.nodes(item["node"])(kind)(item["vmid"]).config.get()
        m = _MARK.search(cfg.get("description") or "")
        if m:
            out.setdefault(m.group(1), []).append((item["node"], int(item["vmid"])))
    return out


def disturb(provider: ProxmoxProvider, pve: Any, ops: list[Op]) -> dict[int, dict[str, Any]]:
    """Apply the out-of-band changes; returns the foreign guests added (vmid -> config)."""
    located = {a: v[0] for a, v in where(provider).items()}
    foreign: dict[int, dict[str, Any]] = {}
    for op in ops:
        if op[0] == "foreign":
            _, vmid, running = op
            if pve.guest(vmid) is None:
                status = "running" if running else "stopped"
                pve.add_ct(vmid, f"other-{vmid}", node="pve-runtime", status=status)
                foreign[vmid] = dict(pve.ct(vmid).config)
            continue
        address = op[1]
        if address not in located or pve.guest(located[address][1]) is None:
            continue  # deleted by an earlier op
        node, vmid = located[address]
        guest = provider.client.nodes(node).lxc(vmid)
        running = pve.ct(vmid).status == "running"
        match op:
            case ("memory", _, mib):
                guest.config.put(memory=mib)
            case ("cores", _, n):
                guest.config.put(cores=n)
            case ("tags", _, tags):
                guest.config.put(tags=";".join(sorted({"reconciler", *tags})))
            case ("stop", _):
                if running:
                    guest.status.stop.post()
            case ("delete", _):
                if running:
                    guest.status.stop.post()
                guest.delete(purge=1)
    return foreign


def test_any_out_of_band_change_is_undone_by_one_converge(
    graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    provider = ProxmoxProvider(
        client=connect(pve_api),
        platform="zpack",
        retry=RetryPolicy(initial=0.0, maximum=0.0),
        sleep=no_sleep,
    )
    assert run(graph, provider).ok
    wanted = {a for a, r in graph.resources.items() if r.kind is Kind.GUEST}

    @settings(
        max_examples=15,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(ops=OPS)
    def example(ops: list[Op]) -> None:
        foreign = disturb(provider, pve, ops)
        pve.requests.clear()
        conv = run(graph, provider)
        assert conv.ok, [c.address for c in conv.rounds[-1].plan.actions]

        observed = anyio.run(lambda: observe_all([provider], graph.platform))
        assert make_plan(graph, observed).actions == ()
        found = where(provider)
        assert set(found) == wanted and all(len(v) == 1 for v in found.values()), found
        for vmid, config in foreign.items():
            assert pve.ct(vmid).config == config
            assert not any(
                m != "GET" and re.search(rf"/{vmid}(/|$)", p) for m, p, _ in pve.requests
            )

        pve.requests.clear()
        again = run(graph, provider)
        assert again.ok and not again.rounds[0].plan.has_changes
        assert mutating_calls(pve) == []

        for vmid in foreign:  # back to the converged platform for the next example
            guest = provider.client.nodes("pve-runtime").lxc(vmid)
            if pve.ct(vmid).status == "running":
                guest.status.stop.post()
            guest.delete(purge=1)

    example()
