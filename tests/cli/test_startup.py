"""Fast start (issue 16): a command imports only what it uses.

Each case runs `main(argv)` in a fresh interpreter and lists the modules it loaded; nothing is
timed. `--version` and `--help` load no command's implementation (no pydantic, no YAML, no live
client); `validate` loads the specs' loading and model (pydantic, YAML) and nothing live. The
demo's flags are defined beside its lab, so `demo --help` must load it: the check that the probe
sees a deferred import at all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reconciler.cli.main import parser
from tests.conftest import ROOT, SPECS

# The live clients and servers, and the simulators' fakes: never for a command that does not
# talk to a platform.
LIVE = {
    "anyio",
    "fakepve",
    "httpx",
    "hypercorn",
    "prometheus_client",
    "proxmoxer",
    "redis",
    "requests",
    "urllib3",
}
# Our layers below loading, and the demo's lab: only the commands that act load them.
ACTING = {
    "reconciler.applying",
    "reconciler.controller",
    "reconciler.demo.lab",
    "reconciler.demo.script",
    "reconciler.importing",
    "reconciler.planning",
    "reconciler.providers",
    "reconciler.simulators",
}
# What reading the specs needs: not for --version or --help.
SPECS_ONLY = {"pydantic", "pydantic_core", "yaml", "reconciler.loading", "reconciler.model.spec"}

PROBE = """
import contextlib, io, json, sys
from reconciler.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def loaded(argv: list[str]) -> tuple[object, set[str]]:
    """The exit code of `reconciler ARGV` and every module (and its packages) it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    names = set()
    for module in report["modules"]:
        parts = module.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return report["code"], names


def offending(names: set[str], forbidden: set[str]) -> list[str]:
    return sorted(forbidden & names)


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["--help"],
        ["plan", "--help"],
        ["apply", "--help"],
        ["run", "--help"],
        ["restore", "--help"],
        ["completion", "--help"],
    ],
    ids=" ".join,
)
def test_the_parser_loads_no_command(argv: list[str]) -> None:
    code, names = loaded(argv)
    assert code == 0
    assert offending(names, LIVE | ACTING | SPECS_ONLY) == []


def test_validate_loads_the_specs_and_nothing_live() -> None:
    code, names = loaded(["validate", str(SPECS)])
    assert code == 0
    assert offending(names, LIVE | ACTING) == []
    assert {"pydantic", "yaml", "reconciler.loading"} <= names  # the probe sees what it loads


def test_demo_flags_are_added_when_the_demo_is_parsed() -> None:
    code, names = loaded(["demo", "--help"])
    assert code == 0
    assert "reconciler.demo.script" in names
    args = parser().parse_args(["demo", "--offline", "--time-scale", "0.5", str(SPECS)])
    assert (args.offline, args.time_scale, args.dir) == (True, 0.5, str(SPECS))


# --- the console script's exit -------------------------------------------------------------------

ENTRY = "import sys; from reconciler.cli.main import entry; sys.argv[0] = 'reconciler'; entry()"


def _entry(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_the_console_script_leaves_with_the_commands_code_and_all_its_output(tmp_path):
    """`entry` skips the heap's teardown (os._exit) but not what the teardown would have done:
    the plan printed whole, the exit code of `--detailed-exitcode`, the file `--out` wrote, and
    an exit handler's output (logging's flush)."""
    saved = tmp_path / "plan.json"
    argv = ("plan", str(SPECS), "--observed", "sample", "--detailed-exitcode", "--color", "never")
    done = _entry(*argv, "--out", str(saved))
    assert done.returncode == 2, done.stderr  # changes: the offline plan of the example
    inproc = subprocess.run(
        [sys.executable, "-c", PROBE_PLAN, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    assert done.stdout == inproc.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("Plan:")
    assert json.loads(saved.read_text())["summary"]
    bad = _entry("validate", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and "nowhere: 1 error" in bad.stdout


def test_an_exit_handler_still_runs_and_its_output_arrives(tmp_path):
    marker = tmp_path / "handler-ran"
    code = (
        "import atexit, sys, threading, time\n"
        "from reconciler.cli import main as m\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        # A thread still at work when the command returns is waited for, as Python would.
        f"late = lambda: (time.sleep(0.2), open({str(marker)!r} + '.t', 'w').write('t'))\n"
        "threading.Thread(target=late).start()\n"
        # An executor's idle worker (Apprise keeps one) is told to stop, as Python's exit does.
        "from concurrent.futures import ThreadPoolExecutor\n"
        "pool = ThreadPoolExecutor(1)\n"
        "pool.submit(int).result()\n"
        "sys.argv = ['reconciler', '--version']\n"
        "m.entry()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reconciler ")
    assert marker.read_text() == "yes"
    assert (tmp_path / "handler-ran.t").read_text() == "t"


PROBE_PLAN = """
import sys
from reconciler.cli.main import main
main(sys.argv[1:])
sys.stdout.flush()
"""


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`reconciler graph specs | head -1`: the pipe closes under the command's writes. No
    traceback, exit 1. The read end is closed before the command writes anything."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "graph", str(SPECS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
