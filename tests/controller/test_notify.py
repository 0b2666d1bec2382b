"""The notifier (reconciler/controller/notify.py) with real receivers the tests start: an HTTP
endpoint that Apprise's `json://` posts to, an SMTP server (aiosmtpd) that takes `mailto://`
with a login, and a port that accepts and never answers. Each event is told once per incident
and its resolution once, to the targets that want it; the hourly limit suppresses and says so
later; a failing target is counted every time and logged once; the secrets in a URL reach the
receiver and never a log line or /status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from prometheus_client.parser import text_string_to_metric_families

from reconciler.controller.logs import JsonFormatter, Redactor
from reconciler.controller.metrics import Metrics
from reconciler.controller.notify import Event, Finding, Notifier, Severity
from reconciler.controller.status import StatusBoard
from reconciler.loading.loader import load_texts
from reconciler.model.spec import PlatformSpec
from tests.waiting import eventually

# --- receivers -------------------------------------------------------------------------------


class HttpReceiver:
    """Takes Apprise's `json://` posts: (path, headers, body) each; answers 200."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        received = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                received.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def titles(self) -> list[str]:
        return [body["title"] for _path, _headers, body in self.got]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A port that accepts connections and never answers: a target that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class MailHandler:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope.mail_from, envelope.rcpt_tos, envelope.content.decode()))
        return "250 OK"


@pytest.fixture
def http() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    port = Silent()
    yield port
    port.close()


# --- the notifier under test -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec_with(targets: str, extra: str = "") -> PlatformSpec:
    text = f"platform: {{name: zpack}}\nnotifications:\n  targets:\n{targets}{extra}"
    loaded = load_texts({"platform.yaml": text})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return loaded.spec


def make(spec: PlatformSpec, redactor: Redactor | None = None) -> tuple[Notifier, Clock]:
    clock = Clock()
    board = StatusBoard("zpack")
    notifier = Notifier(board, Metrics(), redactor=redactor, clock=clock)
    notifier.configure(spec)
    return notifier, clock


def running(notifier: Notifier, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            try:
                await body()
            finally:
                tg.cancel_scope.cancel()

    anyio.run(main)


def counted(notifier: Notifier) -> dict[tuple[str, str], float]:
    return {
        (s.labels["target"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(notifier.metrics.render().decode())
        for s in family.samples
        if s.name == "reconciler_notifications_total"
    }


HELD = Finding(Severity.WARNING, "guest/mc-x: delete held back", "pruning is off")


def test_an_incident_is_told_once_and_its_resolution_once(
    http: HttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.notify")
    spec = spec_with(
        f"    ops: {{url: 'json://127.0.0.1:{http.port}/hook'}}\n"
        f"    errors-only: {{url: 'json://127.0.0.1:{http.port}/errors', min_severity: error}}\n"
        f"    leases: {{url: 'json://127.0.0.1:{http.port}/leases', events: leadership}}\n"
    )
    notifier, clock = make(spec)

    async def body() -> None:
        for _ in range(3):  # three cycles see the same held-back destroy
            notifier.settle(Event.HELD_BACK, {"guest/mc-x": HELD})
            clock.now += 300
        await eventually(lambda: len(http.got) == 1)
        notifier.settle(Event.HELD_BACK, {})  # decided: gone from the plan
        notifier.settle(Event.HELD_BACK, {})
        await eventually(lambda: len(http.got) == 2)
        await eventually(lambda: notifier.inflight == 0)

    running(notifier, body)
    assert [path for path, _h, _b in http.got] == ["/hook", "/hook"]
    assert http.titles() == [
        "[zpack] guest/mc-x: delete held back",
        "[zpack] resolved: guest/mc-x: delete held back",
    ]
    assert [b["type"] for _p, _h, b in http.got] == ["warning", "success"]
    assert http.got[0][2]["message"] == "pruning is off"
    # Listed in /status and the log either way: the other targets did not want it.
    recent = notifier.board.to_json()["notifications"]["recent"]
    assert [(r["state"], r["targets"]) for r in recent] == [
        ("opened", {"ops": "sent"}),
        ("resolved", {"ops": "sent"}),
    ]
    lines = [r for r in caplog.records if r.getMessage() == "notification"]
    assert [r.fields["state"] for r in lines] == ["opened", "resolved"]  # type: ignore[attr-defined]
    assert counted(notifier)[("ops", "sent")] == 2
    assert ("errors-only", "sent") not in counted(notifier)


def test_the_hourly_limit_suppresses_and_the_next_message_says_so(http: HttpReceiver) -> None:
    spec = spec_with(f"    ops: {{url: 'json://127.0.0.1:{http.port}/', max_per_hour: 2}}\n")
    notifier, clock = make(spec)

    async def body() -> None:
        found = {f"guest/g{i}": HELD for i in range(4)}
        notifier.settle(Event.HELD_BACK, found)  # four incidents at once
        await eventually(lambda: len(http.got) == 2 and notifier.inflight == 0)
        target = notifier.to_json()["targets"]["ops"]
        assert (target["sent"], target["suppressed"]) == (2, 2)
        clock.now += 3600  # an hour later the limit has room again
        notifier.settle(Event.HELD_BACK, {**found, "guest/g9": HELD})
        await eventually(lambda: len(http.got) == 3)

    running(notifier, body)
    assert (
        "2 earlier notifications suppressed by the limit of 2 an hour"
        in (http.got[2][2]["message"])
    )
    assert counted(notifier)[("ops", "suppressed")] == 2
    # The suppressed ones are still listed.
    suppressed = [
        r
        for r in notifier.to_json()["recent"]
        if r["targets"] == {"ops": "suppressed"} and r["state"] == "opened"
    ]
    assert len(suppressed) == 2


def test_a_failing_target_is_counted_each_time_logged_once_and_its_recovery(
    http: HttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.notify")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    notifier, _clock = make(spec_with(f"    ops: {{url: 'json://127.0.0.1:{refused}/'}}\n"))

    async def body() -> None:
        for i in range(3):
            notifier.settle(
                Event.HELD_BACK, {f"guest/g{i}": HELD}, keep=[f"guest/g{j}" for j in range(i)]
            )
        await eventually(lambda: notifier.to_json()["targets"]["ops"]["failed"] == 3)
        status = notifier.to_json()["targets"]["ops"]
        assert status["failing"] and "Connection error" in status["last_error"]
        # The target is fixed (a new revision points it at a receiver that answers).
        notifier.configure(spec_with(f"    ops: {{url: 'json://127.0.0.1:{http.port}/'}}\n"))
        notifier.settle(Event.HELD_BACK, {})
        await eventually(lambda: len(http.got) == 3 and notifier.inflight == 0)

    running(notifier, body)
    said = [r.getMessage() for r in caplog.records if "notification target" in r.getMessage()]
    assert said == ["notification target failing", "notification target recovered"]
    assert counted(notifier)[("ops", "failed")] == 3
    assert counted(notifier)[("ops", "sent")] == 3
    assert not notifier.to_json()["targets"]["ops"]["failing"]


def test_secrets_in_urls_reach_the_receivers_never_a_log_or_status(
    http: HttpReceiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    password, token = "smtp-Pa55-w0rd", "hook-T0ken-99"
    monkeypatch.setenv("SMTP_PASSWORD", password)
    monkeypatch.setenv("HOOK_TOKEN", token)
    caplog.set_level(logging.DEBUG)  # Apprise's own lines too
    mail = MailHandler()
    logins: list[tuple[bytes, bytes]] = []

    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == password.encode())

    async def body() -> None:
        loop = asyncio.get_running_loop()
        smtp = await loop.create_server(
            lambda: SMTP(
                mail,
                hostname="127.0.0.1",
                authenticator=authenticate,
                auth_require_tls=False,
                auth_required=False,  # offered all the same; Apprise logs in
            ),
            "127.0.0.1",
            0,
        )
        port = smtp.sockets[0].getsockname()[1]
        try:
            spec = spec_with(
                f"    mail: {{url: 'mailto://ops:{{env:SMTP_PASSWORD}}@127.0.0.1:{port}"
                "?to=oncall@zpack.dev&from=reconciler@zpack.dev&mode=insecure'}\n"
                f"    hook: {{url: 'json://ops:{{env:HOOK_TOKEN}}@127.0.0.1:{http.port}/x'}}\n"
            )
            notifier.configure(spec)
            notifier.settle(Event.HELD_BACK, {"guest/mc-x": HELD})
            await eventually(lambda: mail.mails and http.got and notifier.inflight == 0)
        finally:
            smtp.close()

    redactor = Redactor()
    notifier, _clock = make(spec_with("    none: {url: 'json://127.0.0.1:9/'}\n"), redactor)
    running(notifier, body)
    assert logins == [(b"ops", password.encode())]
    assert mail.mails[0][1] == ["oncall@zpack.dev"]
    assert "Subject: [zpack] guest/mc-x: delete held back" in mail.mails[0][2]
    basic = http.got[0][1]["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(basic).decode() == f"ops:{token}"
    # Nowhere else: not in any log record (Apprise's debug lines included), nor /status.
    formatter = JsonFormatter(redactor)
    for record in caplog.records:
        raw = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        assert password not in raw and token not in raw
        assert password not in formatter.format(record)
    status = json.dumps(notifier.board.to_json())
    assert password not in status and token not in status
    assert notifier.to_json()["targets"]["mail"]["scheme"] == "mailto"


def test_a_target_that_hangs_holds_only_its_own_messages(
    http: HttpReceiver, silent: Silent
) -> None:
    spec = spec_with(
        f"    stuck: {{url: 'json://127.0.0.1:{silent.port}/', timeout: 2s}}\n"
        f"    ops: {{url: 'json://127.0.0.1:{http.port}/'}}\n"
    )
    notifier, _clock = make(spec)

    async def body() -> None:
        notifier.settle(Event.HELD_BACK, {"guest/a": HELD})
        notifier.settle(Event.HELD_BACK, {"guest/b": HELD}, keep=["guest/a"])
        # The other target got both while the stuck one still holds its first.
        await eventually(lambda: len(http.got) == 2)
        assert notifier.targets["stuck"].pending == 2 and silent.held
        await eventually(lambda: notifier.to_json()["targets"]["stuck"]["failed"] == 2)

    running(notifier, body)
    assert notifier.targets["stuck"].last_error == "no answer within 2 s"
    assert notifier.to_json()["targets"]["ops"]["sent"] == 2


def test_drift_is_one_summary_and_only_after_a_converged_cycle() -> None:
    from reconciler.applying.executor import ApplyReport, Outcome, Result
    from reconciler.model.plans import Action, Cause, Change, FieldChange, Plan
    from reconciler.model.resources import Kind

    notifier, _clock = make(spec_with("    ops: {url: 'json://127.0.0.1:9/'}\n"))
    board = notifier.board
    board.record_plan([], in_sync=["guest/a", "guest/b", "velocity/a"])

    def change(address: str, kind: Kind, cause: Cause, action: Action = Action.UPDATE) -> Result:
        fields = (FieldChange("memory", 2048, 4096),) if kind is Kind.GUEST else ()
        c = Change(address, kind, action, 0, fields=fields, cause=cause)
        return Result(c, Outcome.DONE)

    empty = Plan("zpack", (), "")
    notifier.planned(empty, None, [], revision="r1", full=True)  # the baseline
    report = ApplyReport(
        [
            change("guest/a", Kind.GUEST, Cause.DRIFTED),
            change("guest/b", Kind.GUEST, Cause.DRIFTED),
            change("velocity/a", Kind.VELOCITY, Cause.WITHHELD, Action.DELETE),
            change("guest/new", Kind.GUEST, Cause.MISSING, Action.CREATE),
        ]
    )
    notifier.planned(empty, None, [report], revision="r1", full=True)
    drift = [r for r in notifier.recent if r.event is Event.DRIFT_HEALED]
    assert len(drift) == 1
    assert drift[0].title == "drift healed: 2 resources put back as the spec says"
    assert drift[0].body.splitlines() == [
        "~ guest/a: memory 2048 -> 4096",
        "~ guest/b: memory 2048 -> 4096",
    ]
    # The registration the readiness gate removed comes back: not drift. A new revision's
    # changes are not drift either.
    back = ApplyReport([change("velocity/a", Kind.VELOCITY, Cause.MISSING, Action.CREATE)])
    notifier.planned(empty, None, [back], revision="r1", full=True)
    again = ApplyReport([change("guest/a", Kind.GUEST, Cause.DRIFTED)])
    notifier.planned(empty, None, [again], revision="r2", full=True)
    assert len([r for r in notifier.recent if r.event is Event.DRIFT_HEALED]) == 1


def test_a_crash_is_told_at_once_and_resolved_when_the_guest_serves_again() -> None:
    """Unready is told after `unready_after`; a crash the agent counted, at the next
    observation. The crashes counted before the controller first looked are not news."""
    from reconciler.model.observed import GuestHealth, ObservedState
    from reconciler.model.plans import Plan

    notifier, clock = make(spec_with("    ops: {url: 'json://127.0.0.1:9/'}\n"))
    empty = Plan("zpack", (), "")

    def observe(**health: GuestHealth) -> list[tuple[str, str]]:
        notifier.planned(empty, ObservedState(health=health), [], revision="r1", full=False)
        return [(r.state.value, r.title) for r in notifier.recent if r.event is Event.GUEST_UNREADY]

    serving = GuestHealth(running=True, reachable=True, ready=True, crashes=2)
    assert observe(**{"guest/mc": serving}) == []  # two crashes before: the baseline
    down = GuestHealth(running=True, reachable=True, ready=False, crashes=3, error="exit 137")
    told = observe(**{"guest/mc": down})
    assert told == [("opened", "guest/mc: crashed (3 since its agent started)")]
    clock.now += 10  # still coming back: the incident stays open, nothing more is said
    assert observe(**{"guest/mc": down.model_copy(update={"error": None})}) == told
    back = GuestHealth(running=True, reachable=True, ready=True, crashes=3)
    after = observe(**{"guest/mc": back})
    assert after[-1] == ("resolved", "resolved: guest/mc: crashed (3 since its agent started)")
    assert len(after) == 2


def test_what_a_cycle_destroyed_is_one_message_each_cycle_never_suppressed(
    http: HttpReceiver,
) -> None:
    """A pruned guest delete after its final backup: one `destroyed` message naming the guest,
    its vmid and the backup, sent every cycle that destroys (each destroy is news), past the
    hourly limit. A cycle that destroys nothing (an update, a delete that failed) sends none;
    a destroy held back (pruning off) is `held-back` only."""
    from reconciler.applying.executor import ApplyReport, Outcome, Result
    from reconciler.model.plans import Action, Cause, Change, FieldChange, FinalBackup, Plan
    from reconciler.model.resources import Kind

    spec = spec_with(f"    ops: {{url: 'json://127.0.0.1:{http.port}/ops', max_per_hour: 1}}\n")
    notifier, clock = make(spec)
    empty = Plan("zpack", (), "")

    def delete(name: str, vmid: int, **more: Any) -> Change:
        return Change(
            f"guest/{name}",
            Kind.GUEST,
            Action.DELETE,
            0,
            id={"vmid": vmid, "node": "pve-runtime"},
            destroys=("rootfs 8 GiB",),
            cause=Cause.NOT_IN_SPEC,
            **more,
        )

    backup = FinalBackup("backup", job="backup/worlds")
    pruned = delete("mc-old", 1005, final_backup=backup)
    update = Change(
        "guest/mc-lobby", Kind.GUEST, Action.UPDATE, 0, fields=(FieldChange("memory", 1, 2),)
    )
    held = delete("mc-held", 1006, blocked="pruning is off (platform.prune)")

    def destroyed() -> list[dict[str, Any]]:
        return [b for _p, _h, b in http.got if b["title"].startswith("[zpack] destroyed")]

    async def body() -> None:
        # Something else fills the hour: the destroy is sent all the same.
        notifier.announce(Event.DRIFT_HEALED, "cycle", Finding(Severity.WARNING, "drift", "x"))
        done = ApplyReport([Result(pruned, Outcome.DONE), Result(update, Outcome.DONE)])
        notifier.planned(empty, None, [done], revision="r1", full=True)
        await eventually(lambda: len(destroyed()) == 1 and notifier.inflight == 0)
        # Nothing destroyed: an update, a delete that failed, a dry run; a held-back destroy.
        nothing = ApplyReport(
            [
                Result(update, Outcome.DONE),
                Result(delete("mc-gone", 1007), Outcome.FAILED, "storage is offline"),
                Result(delete("mc-dry", 1008), Outcome.DRY_RUN),
            ]
        )
        notifier.planned(Plan("zpack", (held,), ""), None, [nothing], revision="r1", full=True)
        clock.now += 60
        # The next cycle destroys again (a replace, its disks named): told again.
        replace_of = Change(
            "guest/mc-new",
            Kind.GUEST,
            Action.REPLACE,
            0,
            id={"vmid": 1009, "node": "pve-runtime"},
            destroys=("rootfs 8 GiB", "mp0 50 GiB"),
        )
        notifier.planned(
            Plan("zpack", (held,), ""),
            None,
            [ApplyReport([Result(replace_of, Outcome.DONE)])],
            revision="r1",
            full=True,
        )
        await eventually(lambda: len(destroyed()) == 2 and notifier.inflight == 0)

    running(notifier, body)
    first, second = destroyed()
    assert first["title"] == "[zpack] destroyed: guest/mc-old"
    assert first["type"] == "warning"
    assert first["message"] == (
        "- guest/mc-old (vmid 1005 on pve-runtime): delete; destroyed rootfs 8 GiB; "
        "after a final backup to storage 'backup' (backup/worlds)"
    )
    assert second["title"] == "[zpack] destroyed: guest/mc-new"
    assert second["message"].splitlines() == [
        "-/+ guest/mc-new (vmid 1009 on pve-runtime): replace; destroyed rootfs 8 GiB, "
        "mp0 50 GiB; no final backup",
        "(1 earlier notification suppressed by the limit of 1 an hour: /status lists them)",
    ]
    events = [(r.event, r.title) for r in notifier.recent]
    assert events == [
        (Event.DRIFT_HEALED, "drift"),
        (Event.DESTROYED, "destroyed: guest/mc-old"),
        (Event.HELD_BACK, "guest/mc-held: delete held back"),
        (Event.DESTROYED, "destroyed: guest/mc-new"),
    ]
    # The held-back destroy went to the same hour's limit: suppressed, never a `destroyed`.
    assert notifier.recent[2].deliveries == {"ops": "suppressed"}
    assert [r.deliveries for r in notifier.recent if r.event is Event.DESTROYED] == [
        {"ops": "sent"},
        {"ops": "sent"},
    ]
    assert "mc-gone" not in str(http.got) and "mc-dry" not in str(http.got)
