"""One command line (issue 17): every command takes the spec directory, `--color` and its
environment the same way; `apply` not confirmed is a failure; an unknown `--target` is an error
with the nearest addresses; `apply` and `observe` speak JSON in a documented shape; counts have
the right number; a broken YAML file hides nobody else's mistakes; and the shells complete it.

The command list is read from the parser itself, so a command added later is held to the same
rules. The live cases run against fakepve (`pve_api`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import render
from reconciler.cli.completion import completion_script
from reconciler.cli.main import DESCRIPTION, ENV_MEANING, ENVIRONMENT, main, parser
from reconciler.model import observed as observed_model
from reconciler.model import plans
from tests.cli.test_live import flags
from tests.conftest import ROOT, SPECS
from tests.fakepve_fixtures import mutating_calls

README = (ROOT / "README.md").read_text(encoding="utf-8")
# Commands that read specs, each with the spec directory as DIR and --dir DIR.
READS_SPECS = {
    "validate", "graph", "plan", "observe", "apply", "run", "import", "check", "restore", "demo",
}  # fmt: skip
# ... and those whose positional arguments are a list (guests, addresses): --dir only.
DIR_FLAG_ONLY = {"adopt", "backup", "backups"}
# No --color: a JSON Schema, a shell script, and the two that run until stopped and log.
NO_COLOR = {"schema", "completion", "run", "lab"}
# Commands whose owner has yet to add --color, held strictly: once one has it, the test says
# to take it out of here.
COLOR_TO_COME: set[str] = set()
ESC = "\x1b["


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, its deferred flags (the demo's, the lab's) added."""
    [sub] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in sub.choices.values():
        getattr(command, "add_deferred_args", lambda: None)()
    return dict(sub.choices)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def required_args(command: argparse.ArgumentParser) -> list[str]:
    """The least a command parses with, the spec directory left out."""
    argv: list[str] = []
    for a in command._actions:
        if a.dest == "dir" or isinstance(a, argparse._HelpAction):
            continue
        value = str(next(iter(a.choices))) if a.choices else "x"
        if a.option_strings and a.required:
            argv += [a.option_strings[0], value]
        elif not a.option_strings and a.nargs in (None, "+"):
            argv.append(value)
    return argv


def options(command: argparse.ArgumentParser) -> set[str]:
    return {s for a in command._actions for s in a.option_strings}


@pytest.fixture
def broken_specs(tmp_path: Path) -> Path:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    (specs / "oops.yaml").write_text("guests:\n  mc-x:\n    role: game\n    memroy: 2G\n")
    return specs


# --- the spec directory --------------------------------------------------------------------------


def test_every_command_that_reads_specs_takes_dir_and_the_dir_flag() -> None:
    found = commands()
    with_dir = {n for n, c in found.items() if any(a.dest == "dir" for a in c._actions)}
    assert with_dir >= READS_SPECS | DIR_FLAG_ONLY
    for name in sorted(with_dir):
        command = found[name]
        assert "--dir" in options(command), name
        positional = any(a.dest == "dir" and not a.option_strings for a in command._actions)
        lists = any(not a.option_strings and a.nargs in ("*", "+") for a in command._actions)
        assert positional == (not lists), f"{name}: DIR positional unless it takes a list"
        base = [name, *required_args(command)]
        assert parser().parse_args([*base, "--dir", "d1"]).dir == "d1", name
        if positional:
            assert parser().parse_args([*base, "d2"]).dir == "d2", name
            with pytest.raises(SystemExit):
                parser().parse_args([*base, "d2", "--dir", "d1"])  # given twice: refused


def test_dir_defaults_to_specs_and_the_flag_works_end_to_end(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert parser().parse_args(["graph"]).dir == "specs"
    code, by_flag, _ = run(["graph", "--dir", str(SPECS)], capsys)
    assert code == 0 and by_flag == run(["graph", str(SPECS)], capsys)[1]


# --- --color -------------------------------------------------------------------------------------


def test_every_command_that_prints_has_color() -> None:
    for name, command in commands().items():
        if name in NO_COLOR:
            continue
        found = [a for a in command._actions if "--color" in a.option_strings]
        if name in COLOR_TO_COME:
            assert not found, f"{name} has --color now: take it out of COLOR_TO_COME"
            continue
        [color] = found
        assert list(color.choices or ()) == ["auto", "always", "never"], name


@pytest.mark.parametrize(
    "argv",
    [
        ["validate"],
        ["graph"],
        ["plan", "--observed", "sample"],
        ["observe"],
        ["apply"],
        ["check"],
        ["backup", "mc-lobby"],
        ["backups"],
        ["restore", "mc-lobby"],
        ["adopt", "guest/mc-lobby"],
    ],
    ids=lambda argv: argv[0],
)
def test_color_colors_the_specs_diagnostics(
    argv: list[str], broken_specs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid specs stop every command before it connects: their diagnostics, colored as
    asked."""
    command = [*argv, "--dir", str(broken_specs)]
    code, out, err = run([*command, "--color", "always"], capsys)
    assert code == 1
    assert f"{ESC}31merror:{ESC}0m" in out + err and "memroy" in out + err
    code, out, err = run([*command, "--color", "never"], capsys)
    assert code == 1 and "memroy" in out + err and ESC not in out + err


def test_graph_colors_its_waves(capsys: pytest.CaptureFixture[str]) -> None:
    assert f"{ESC}1mwave 0:" in run(["graph", str(SPECS), "--color", "always"], capsys)[1]
    assert ESC not in run(["graph", str(SPECS), "--color", "never"], capsys)[1]


# --- environment ---------------------------------------------------------------------------------


def environment_section(command: argparse.ArgumentParser) -> str:
    text = command.format_help()
    return text.split("\nenvironment:\n", 1)[1] if "\nenvironment:\n" in text else ""


def test_each_commands_help_lists_the_variables_it_reads() -> None:
    for name, command in commands().items():
        names = options(command) | {a.dest for a in command._actions}
        section = environment_section(command)
        for cmd, flag, var in ENVIRONMENT:
            if cmd in ("", name) and flag in names:
                assert re.search(rf"^  {var}\s", section, re.M), f"{name} --help: {var}"
    run_help = environment_section(commands()["run"])
    assert "RECONCILER_DIR" in run_help and "RECONCILER_INTERVAL" in run_help
    assert "RECONCILER_REDIS_URL" in environment_section(commands()["apply"])
    assert "RECONCILER_DIR" not in environment_section(commands()["plan"])


def variables_read_in_the_cli() -> set[str]:
    """Every RECONCILER_* variable the CLI's sources name or build (service.py's `_env`)."""
    found: set[str] = set()
    for path in (ROOT / "reconciler" / "cli").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        found |= set(re.findall(r"\bRECONCILER_[A-Z][A-Z_]*[A-Z]\b", text))
        found |= {f"RECONCILER_{n}" for n in re.findall(r'\b_env\(\s*"([A-Z_]+)"', text)}
        for flag in re.findall(r'_seconds_flag\(\s*\w+,\s*"--([a-z-]+)"', text):
            found.add("RECONCILER_" + flag.upper().replace("-", "_"))
    found.discard("RECONCILER_DEMO_PVE_PASSWORD")  # set by the demo's lab, not read from you
    return found


def test_every_variable_the_cli_reads_is_in_the_help_table() -> None:
    listed = {var for _, _, var in ENVIRONMENT}
    assert variables_read_in_the_cli() <= listed
    assert {"RECONCILER_REDIS_URL", "RECONCILER_LEASE_NAME", "RECONCILER_DIR"} <= listed


SAMPLES = {"--log-format": ("text", "text"), "--log-level": ("debug", "debug")}


@pytest.mark.parametrize(
    "entry", [e for e in ENVIRONMENT if e[2] not in ENV_MEANING], ids=lambda e: e[2]
)
def test_every_listed_variable_is_the_default_of_its_flag(
    entry: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table is true: setting the variable changes the flag's default, on each command."""
    cmd, flag, var = entry
    raw, want = SAMPLES.get(flag, ("7", None))
    monkeypatch.setenv(var, raw)
    found = commands()
    names = [cmd] if cmd else [n for n, c in found.items() if flag in options(c)]
    assert names, f"no command has {flag}"
    for name in names:
        args = parser().parse_args([name, *required_args(found[name])])
        dest = next(a.dest for a in found[name]._actions if flag in (*a.option_strings, a.dest))
        assert getattr(args, dest) in ((want,) if want else ("7", 7.0)), (name, var)


def test_the_variables_that_are_no_flags_default_are_the_ones_read() -> None:
    """PVE_TOKEN_SECRET and the lab's PVE_PASSWORD are listed by what they mean: true to the
    code that reads them."""
    from reconciler.applying.connecting import DEFAULT_TOKEN_SECRET
    from reconciler.cli.lab import DEFAULT_PASSWORD_ENV

    assert DEFAULT_TOKEN_SECRET.env == "PVE_TOKEN_SECRET"
    lab = parser().parse_args(["lab"])
    assert lab.password_env == DEFAULT_PASSWORD_ENV == "PVE_PASSWORD"
    assert {"PVE_TOKEN_SECRET", "PVE_PASSWORD"} <= set(ENV_MEANING)


# --- help ----------------------------------------------------------------------------------------


def test_the_top_level_help_says_a_whole_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert DESCRIPTION in text and DESCRIPTION.endswith(".")
    assert "Each command takes the spec directory as DIR or --dir DIR" in text


# --- apply and observe, live ---------------------------------------------------------------------


def test_apply_json_then_again_then_observe(
    pve_api: Any, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        ["apply", str(SPECS), "--auto-approve", "--format", "json", *flags(pve_api)], capsys
    )
    assert code == 0, err
    doc = json.loads(out)  # stdout is the document alone: progress and the plan are on stderr
    assert (doc["format"], doc["format_version"]) == (render.APPLY_FORMAT, 1)
    assert (doc["platform"], doc["outcome"], doc["dry_run"]) == ("zpack", "applied", False)
    assert doc["summary"] == {"done": 53, "failed": 0, "skipped": 0, "dry-run": 0}
    [round_] = doc["rounds"]
    assert round_["plan"]["format"] == plans.FORMAT and round_["again"] is None
    results = round_["results"]
    assert len(results) == 53 and {r["outcome"] for r in results} == {"done"}
    lobby = next(r for r in results if r["address"] == "guest/mc-lobby")
    assert (lobby["kind"], lobby["action"], lobby["error"]) == ("guest", "create", None)
    assert "[53/53]" in err

    code, out, _ = run(
        ["apply", str(SPECS), "--auto-approve", "--format", "json", *flags(pve_api)], capsys
    )
    again = json.loads(out)
    assert code == 0 and again["outcome"] == "no-changes" and again["rounds"][0]["results"] == []

    code, out, _ = run(
        ["apply", str(SPECS), "--auto-approve", "--color", "never", *flags(pve_api)], capsys
    )
    assert code == 0 and "No changes. 53 resources match the spec." in out  # said, not silent

    code, out, _ = run(
        ["observe", str(SPECS), "--format", "text", "--color", "never", *flags(pve_api)], capsys
    )
    assert code == 0
    assert out.splitlines()[-1] == "54 resources: 53 owned, 1 not owned."  # the VM template
    assert "  guest/mc-lobby  (vmid 1000, node pve-runtime)" in out

    code, out, _ = run(["observe", str(SPECS), *flags(pve_api)], capsys)
    snapshot = json.loads(out)
    assert snapshot["format"] == observed_model.FORMAT
    assert snapshot["format_version"] == documented_version("reconciler/observed-state")


def test_apply_not_confirmed_is_cancelled_in_json_too(
    pve_api: Any, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["apply", str(SPECS), "--format", "json", *flags(pve_api)], capsys)
    assert code == 1
    doc = json.loads(out)
    assert doc["outcome"] == "cancelled" and doc["rounds"][0]["results"] == []
    assert doc["rounds"][0]["plan"]["summary"]["create"] == 52
    assert err.endswith("Apply cancelled.\n")
    assert mutating_calls(pve) == []


def test_an_unknown_target_is_an_error_and_nothing_changes(
    pve_api: Any, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["apply", str(SPECS), "--auto-approve", *flags(pve_api)]
    code, out, err = run([*argv, "--target", "guest/mc-lobyy"], capsys)
    assert code == 1 and out == ""
    assert "--target guest/mc-lobyy: no resource has this address" in err
    assert "did you mean guest/mc-lobby" in err and "Nothing was changed." in err
    assert mutating_calls(pve) == []
    code, _, err = run(["plan", str(SPECS), "--target", "guest/mc-lobyy", *flags(pve_api)], capsys)
    assert code == 1 and "did you mean guest/mc-lobby" in err
    # A known address, and a prefix, are targets as before.
    code, out, _ = run([*argv, "--target", "guest/mc-lobby", "--color", "never"], capsys)
    assert code == 0 and ", 0 failed, 0 skipped." in out
    assert {path for _, path in mutating_calls(pve) if "/lxc" in path} <= {
        p for _, p in mutating_calls(pve) if "/1000" in p or p.endswith("/lxc")
    }  # only mc-lobby (vmid 1000) among the guests


@pytest.mark.parametrize(
    ("targets", "ok"),
    [
        (["guest/mc-oldmap"], True),  # not in the specs, but ours on the platform: a delete
        (["guest/"], True),
        (["firewal/"], False),
        (["guest/mc-lobby", "guest/nope"], False),
    ],
)
def test_offline_plans_check_targets_against_specs_and_snapshot(
    targets: list[str], ok: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", str(SPECS), "--observed", "sample"]
    code, out, err = run([*argv, *(f"--target={t}" for t in targets)], capsys)
    assert code == (0 if ok else 1), err
    if not ok:
        assert out == "" and "no resource has this address" in err
        assert "firewall/" in err if targets == ["firewal/"] else "--target guest/nope" in err


# --- documents and the README --------------------------------------------------------------------


def documented_version(fmt: str) -> int:
    match = re.search(rf"`format: {re.escape(fmt)}`, `format_version: (\d+)`", README)
    assert match, f"the README documents {fmt}"
    return int(match.group(1))


def test_the_readme_documents_each_json_shape_at_its_version() -> None:
    assert documented_version("reconciler/observed-state") == observed_model.FORMAT_VERSION
    assert documented_version("reconciler/plan") == plans.FORMAT_VERSION
    assert documented_version(render.APPLY_FORMAT) == render.APPLY_FORMAT_VERSION
    section = README.split("**Apply JSON**", 1)[1].split("\n\n", 1)[0]
    for outcome in render.APPLY_OUTCOMES:
        assert f"`{outcome}`" in section
    sample = json.loads((ROOT / "reconciler/data/sample-observed.json").read_text())
    assert sample["format_version"] == observed_model.FORMAT_VERSION


# --- counts and broken files ---------------------------------------------------------------------


@pytest.mark.parametrize(("count", "text"), [(0, "0 errors"), (1, "1 error"), (2, "2 errors")])
def test_plural(count: int, text: str) -> None:
    assert render.plural(count, "error") == text


MINE = ["render.py", "main.py", "live.py", "check.py", "backups.py", "completion.py"]


def test_no_count_is_printed_with_a_fixed_plural() -> None:
    """`{n} errors` reads "1 errors": every count goes through `render.plural`."""
    nouns = "errors|warnings|files|guests|resources|paths|privileges|changes|backups"
    for name in MINE:
        text = (ROOT / "reconciler" / "cli" / name).read_text(encoding="utf-8")
        assert not re.findall(
            rf"\{{(?:len\(|errors|warnings|files)[^{{}}]*\}} (?:{nouns})\b", text
        ), name


def test_validate_reports_every_files_mistakes_and_counts_them_right(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    (specs / "broken.yaml").write_text("guests: [\n")
    code, out, _ = run(["validate", str(specs), "--color", "never"], capsys)
    files = len(list(specs.glob("*.yaml")))
    assert code == 1 and out.splitlines()[-1] == f"{specs}: 1 error, 0 warnings in {files} files"
    game = specs / "game.yaml"
    game.write_text(game.read_text().replace("  mc-lobby:\n", "  mc-lobby:\n    memroy: 3\n", 1))
    code, out, _ = run(["validate", str(specs), "--color", "never"], capsys)
    assert code == 1
    assert f"{specs}/broken.yaml:2:1: error: invalid YAML" in out
    assert re.search(rf"^{re.escape(str(game))}:\d+:5: error: unknown field 'memroy'", out, re.M)
    assert out.splitlines()[-1] == f"{specs}: 2 errors, 0 warnings in {files} files"


# --- completion ----------------------------------------------------------------------------------

RECONCILER = str(Path(sys.executable).parent / "reconciler")


def bash(script: str) -> str:
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def completions(*words: str) -> list[str]:
    """What bash offers for the last of `words`, through the generated function."""
    quoted = " ".join(f"'{w}'" for w in words)
    return bash(
        f"source <({RECONCILER} completion bash)\n"
        f"COMP_WORDS=(reconciler {quoted}); COMP_CWORD={len(words)}\n"
        '_reconciler; printf "%s\\n" "${COMPREPLY[@]}"'
    ).split()


def test_bash_completion_is_registered_and_completes() -> None:
    registered = bash(f"source <({RECONCILER} completion bash); complete -p reconciler")
    assert "-F _reconciler" in registered and registered.strip().endswith("reconciler")
    assert completions("val") == ["validate"]
    assert completions("plan", "--format", "") == ["text", "json", "markdown"]
    assert completions("apply", "--fo") == ["--format"]
    assert completions("observe", "--format", "t") == ["text"]
    assert completions("completion", "") == ["bash", "zsh", "fish"]
    assert completions("validate", "spe") == ["specs"]  # the spec directory: directories
    assert "--color" in completions("check", "--c")


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_hold_every_command(shell: str, tmp_path: Path) -> None:
    found = commands()
    script = completion_script(shell, parser())
    for name, command in found.items():
        assert re.search(rf"\b{re.escape(name)}\b", script), name
        for flag in options(command):
            assert flag.lstrip("-") in script, (name, flag)
    binary = shutil.which(shell)
    if binary is not None:  # only where the shell is installed: its own syntax check
        path = tmp_path / f"reconciler.{shell}"
        path.write_text(script)
        subprocess.run([binary, "-n", str(path)], check=True, timeout=60)


def test_the_completion_command_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["completion", "fish"], capsys)
    assert code == 0 and out == completion_script("fish", parser())
    assert "complete -c reconciler -n '__fish_seen_subcommand_from apply' -l format" in out


@pytest.mark.parametrize(
    "argv",
    [["plan", "specs", "--detailed-exit-code"], ["plann"], ["apply", "--target"]],
    ids=["mistyped-flag", "unknown-command", "missing-value"],
)
def test_a_command_line_that_does_not_parse_exits_1_not_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --detailed-exitcode` says changes with 2: a CI script must not read a mistyped
    flag as that. argparse's own code is 2; ours is 1, an error, as the epilog says."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("usage: reconciler") and "error:" in err
