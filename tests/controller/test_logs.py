"""Structured logs: one JSON object per line, fields merged, secrets never written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from reconciler.controller.logs import (
    JsonFormatter,
    Redactor,
    TextFormatter,
    fields,
    setup_logging,
)

SECRET = "s3cr3t-P@ss/word"


@pytest.fixture
def restore_root() -> Iterator[None]:
    """setup_logging changes the root logger: put back what pytest had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_fields_and_secrets(restore_root: None) -> None:
    out = io.StringIO()
    redactor = setup_logging("json", "debug", out)
    redactor.add(SECRET)
    log = logging.getLogger("reconciler.controller.test")

    log.info("cycle done", extra=fields(kind="full", outcome="changed", seconds=1.25))
    log.warning("login as root@pam with %s failed", SECRET, extra=fields(detail=[SECRET]))
    log.debug("connect", extra={"fields": {"url": "https://root:hunter2@pve:8006/api2/json"}})
    try:
        raise RuntimeError(f"boom\nwith {SECRET}")
    except RuntimeError:
        log.exception("apply failed", extra=fields(address="guest/api", event="clash"))

    text = out.getvalue()
    assert SECRET not in text
    assert "hunter2" not in text
    assert len(text.splitlines()) == 4  # the traceback stayed on its line
    first, second, third, fourth = lines(out)
    assert first["event"] == "cycle done"
    assert first["level"] == "info"
    assert first["logger"] == "reconciler.controller.test"
    assert (first["kind"], first["outcome"], first["seconds"]) == ("full", "changed", 1.25)
    assert str(first["ts"]).endswith("Z")
    assert second["event"] == "login as root@pam with *** failed"
    assert second["detail"] == ["***"]
    assert third["url"] == "https://root:***@pve:8006/api2/json"
    assert fourth["event"] == "apply failed"
    assert fourth["address"] == "guest/api"
    assert fourth["fields"] == {"event": "clash"}  # a fixed key is never overwritten
    assert "Traceback" in str(fourth["exc"])
    assert "RuntimeError: boom\nwith ***" in str(fourth["exc"])


def test_level_filters(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("json", "warning", out)
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").error("shown")
    assert [line["event"] for line in lines(out)] == ["shown"]


def test_setup_twice_does_not_double_lines(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("json", "info", out)
    setup_logging("json", "info", out)
    logging.getLogger("x").info("once")
    assert len(lines(out)) == 1


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="level"):
        setup_logging("json", "loud")
    with pytest.raises(ValueError, match="format"):
        setup_logging("xml", "info")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("password=hunter2 next", "password=*** next"),
        ("login token: abc123", "login token: ***"),
        ('{"secret": "xyz"}', '{"secret": "***"}'),
        ("bridge_secret=q1w2&x=1", "bridge_secret=***&x=1"),
        ("redis://:pw0rd@redis:6379/0", "redis://:***@redis:6379/0"),
        ("Authorization: PVEAPIToken=root@pam!ci=1234-abcd", "Authorization: PVEAPIToken=***"),
        ("Authorization: Bearer eyJhbGci", "Authorization: Bearer ***"),
        ("nothing to hide here", "nothing to hide here"),
    ],
)
def test_patterns_are_masked(raw: str, masked: str) -> None:
    assert Redactor().text(raw) == masked


def test_registered_secret_in_any_form() -> None:
    redactor = Redactor((SECRET, ""))
    assert redactor.text(f"x {SECRET} y") == "x *** y"
    assert redactor.text("https://pve/?p=s3cr3t-P%40ss%2Fword") == "https://pve/?p=***"
    assert redactor.value({"password": "plain", "nested": {"api_key": 5}, "n": 3}) == {
        "password": "***",
        "nested": {"api_key": "***"},
        "n": 3,
    }


def test_text_format_is_redacted_too() -> None:
    formatter = TextFormatter(Redactor((SECRET,)))
    record = logging.LogRecord("reconciler", logging.INFO, __file__, 1, "using %s", (SECRET,), None)
    record.fields = {"node": "pve1", "password": SECRET}
    line = formatter.format(record)
    assert SECRET not in line
    assert line.endswith('info reconciler: using *** node="pve1" password="***"')


def test_unserializable_field_is_logged_as_text() -> None:
    record = logging.LogRecord("r", logging.INFO, __file__, 1, "m", None, None)
    record.fields = {"obj": object.__new__(Redactor)}
    doc = json.loads(JsonFormatter().format(record))
    assert "Redactor" in doc["obj"]
