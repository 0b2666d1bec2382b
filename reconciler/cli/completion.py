"""`reconciler completion bash|zsh|fish`: a shell completion script, generated from the
command line's own parser, so it offers exactly the commands and flags there are.

    source <(reconciler completion bash)                       # bash (~/.bashrc)
    reconciler completion zsh > "${fpath[1]}/_reconciler"      # zsh (a directory in $fpath)
    reconciler completion fish > ~/.config/fish/completions/reconciler.fish

`describe` walks the argparse parser (its subcommands, their options and positional arguments)
into plain data; one function per shell writes the script from it. What is completed: the
commands, each command's flags, a flag's choices (`--format json`), files after a FILE flag,
directories after a DIR flag and for the spec directory. Nothing is asked of the specs or the
platform (a GUEST is not completed). `reconciler.cli.main` registers the command with
`add_completion_parser`; it costs only the standard library.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

SHELLS = ("bash", "zsh", "fish")


@dataclass(frozen=True)
class Values:
    """What an option's value or a positional argument is: one of `choices`, a file, a
    directory, or anything ("")."""

    choices: tuple[str, ...] = ()
    kind: str = ""  # "file", "dir" or ""

    @classmethod
    def of(cls, action: argparse.Action) -> Values:
        if action.choices is not None:
            return cls(choices=tuple(str(c) for c in action.choices))
        metavar = str(action.metavar or "")
        return cls(kind={"FILE": "file", "DIR": "dir"}.get(metavar, ""))


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    values: Values
    repeatable: bool
    metavar: str


@dataclass(frozen=True)
class Positional:
    name: str
    values: Values
    many: bool  # GUEST... rather than one


@dataclass(frozen=True)
class CommandLine:
    name: str
    help: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]


def _text(help: Any) -> str:
    """A help text on one line, as short as a completion menu wants it."""
    if not isinstance(help, str) or help == argparse.SUPPRESS:
        return ""
    one = " ".join(help.split())
    return one if len(one) <= 90 else one[:87].rstrip() + "..."


def _options(p: argparse.ArgumentParser) -> tuple[tuple[Option, ...], tuple[Positional, ...]]:
    options: list[Option] = []
    positionals: list[Positional] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            options.append(
                Option(
                    flags=tuple(action.option_strings),
                    help=_text(action.help),
                    takes_value=action.nargs != 0,
                    values=Values.of(action),
                    repeatable=isinstance(action, argparse._AppendAction),
                    metavar=str(action.metavar or action.dest.upper()),
                )
            )
        else:
            positionals.append(
                Positional(
                    name=str(action.metavar or action.dest),
                    values=Values.of(action),
                    many=action.nargs in ("*", "+"),
                )
            )
    return tuple(options), tuple(positionals)


def describe(
    root: argparse.ArgumentParser,
) -> tuple[tuple[CommandLine, ...], tuple[Option, ...]]:
    """The commands of `root` (in the order --help lists them) and its own options. A command
    whose flags are added when it is parsed (`CommandParser.add_deferred_args`) gets them now."""
    top, _ = _options(root)
    found: list[CommandLine] = []
    for action in root._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: _text(a.help) for a in action._choices_actions}
        for name, sp in action.choices.items():
            add: Callable[[], None] | None = getattr(sp, "add_deferred_args", None)
            if add is not None:
                add()
            options, positionals = _options(sp)
            found.append(CommandLine(name, helps.get(name, ""), options, positionals))
    return tuple(found), top


# --- bash ----------------------------------------------------------------------------------------


def _compgen(values: Values) -> str:
    """The bash words that complete `values`, as a command that fills COMPREPLY."""
    if values.choices:
        words = " ".join(values.choices)
        return f'mapfile -t COMPREPLY < <(compgen -W "{words}" -- "$cur")'
    if values.kind == "file":
        return 'mapfile -t COMPREPLY < <(compgen -f -- "$cur")'
    if values.kind == "dir":
        return 'mapfile -t COMPREPLY < <(compgen -d -- "$cur")'
    return "COMPREPLY=()"


def bash_script(commands: tuple[CommandLine, ...], top: tuple[Option, ...]) -> str:
    names = " ".join([c.name for c in commands] + [f for o in top for f in o.flags])
    cases = []
    for c in commands:
        flags = " ".join(f for o in c.options for f in o.flags)
        lines = [f"        {c.name})", '            case "$prev" in']
        for o in c.options:
            if o.takes_value:
                lines.append(
                    f"                {'|'.join(o.flags)}) {_compgen(o.values)}; return 0 ;;"
                )
        lines += [
            "            esac",
            '            if [[ "$cur" == -* ]]; then',
            f'                mapfile -t COMPREPLY < <(compgen -W "{flags}" -- "$cur")',
        ]
        first = c.positionals[0].values if c.positionals else Values()
        lines += [
            "            else",
            f"                {_compgen(first)}",
            "            fi",
            "            ;;",
        ]
        cases.append("\n".join(lines))
    body = "\n".join(cases)
    return f"""\
# bash completion for reconciler; generated by `reconciler completion bash`.
# Load it with: source <(reconciler completion bash)
_reconciler() {{
    local cur prev cmd i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ "${{COMP_WORDS[i]}}" != -* ]]; then
            cmd="${{COMP_WORDS[i]}}"
            break
        fi
    done
    COMPREPLY=()
    case "$cmd" in
        "")
            mapfile -t COMPREPLY < <(compgen -W "{names}" -- "$cur")
            ;;
{body}
    esac
    return 0
}}
complete -o filenames -F _reconciler reconciler
"""


# --- zsh -----------------------------------------------------------------------------------------


def _zsh_quote(text: str) -> str:
    """Inside single quotes, in an _arguments spec or a _describe item: no bracket or colon
    left to end a field."""
    for a, b in (("\\", "\\\\"), ("[", "\\["), ("]", "\\]"), (":", "\\:"), ("'", "'\\''")):
        text = text.replace(a, b)
    return text


def _zsh_action(values: Values) -> str:
    if values.choices:
        return "(" + " ".join(values.choices) + ")"
    return {"file": "_files", "dir": "_files -/"}.get(values.kind, " ")


def zsh_script(commands: tuple[CommandLine, ...], top: tuple[Option, ...]) -> str:
    items = "\n".join(f"        '{c.name}:{_zsh_quote(c.help)}'" for c in commands)
    cases = []
    for c in commands:
        specs = []
        for o in c.options:
            for flag in o.flags:
                spec = f"{'*' if o.repeatable else ''}{flag}[{_zsh_quote(o.help)}]"
                if o.takes_value:
                    spec += f":{_zsh_quote(o.metavar)}:{_zsh_action(o.values)}"
                specs.append(f"'{spec}'")
        for position, arg in enumerate(c.positionals, 1):
            where = "*" if arg.many else str(position)
            specs.append(f"'{where}:{_zsh_quote(arg.name)}:{_zsh_action(arg.values)}'")
        lines = " \\\n            ".join(specs)
        cases.append(
            f"        ({c.name})\n          _arguments \\\n            {lines}\n          ;;"
        )
    body = "\n".join(cases)
    tops = " \\\n    ".join(f"'(- *){f}[{_zsh_quote(o.help)}]'" for o in top for f in o.flags)
    return f"""\
#compdef reconciler
# zsh completion for reconciler; generated by `reconciler completion zsh`.
# Install it as _reconciler in a directory of $fpath, or: source <(reconciler completion zsh)

_reconciler() {{
  local context state state_descr line
  typeset -A opt_args
  _arguments -C \\
    {tops} \\
    '1:command:->command' \\
    '*::argument:->argument'
  case $state in
    (command)
      local -a commands
      commands=(
{items}
      )
      _describe -t commands 'reconciler command' commands
      ;;
    (argument)
      case $words[1] in
{body}
      esac
      ;;
  esac
}}

if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
  _reconciler "$@"
else
  compdef _reconciler reconciler
fi
"""


# --- fish ----------------------------------------------------------------------------------------


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_values(values: Values) -> str:
    if values.choices:
        return "-x -a " + _fish_quote(" ".join(values.choices))
    if values.kind == "file":
        return "-r -F"
    if values.kind == "dir":
        return "-x -a '(__fish_complete_directories)'"
    return "-x"


def fish_script(commands: tuple[CommandLine, ...], top: tuple[Option, ...]) -> str:
    lines = [
        "# fish completion for reconciler; generated by `reconciler completion fish`.",
        "# Install: reconciler completion fish > ~/.config/fish/completions/reconciler.fish",
        "complete -c reconciler -f",
    ]

    def option_line(condition: str, o: Option) -> str:
        names = " ".join(f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}" for f in o.flags)
        values = f" {_fish_values(o.values)}" if o.takes_value else ""
        return f"complete -c reconciler -n {condition} {names}{values} -d {_fish_quote(o.help)}"

    for o in top:
        lines.append(option_line("__fish_use_subcommand", o))
    for c in commands:
        lines.append(
            f"complete -c reconciler -n __fish_use_subcommand -a {c.name} -d {_fish_quote(c.help)}"
        )
    for c in commands:
        condition = _fish_quote(f"__fish_seen_subcommand_from {c.name}")
        lines += [option_line(condition, o) for o in c.options]
        if c.positionals and (c.positionals[0].values.choices or c.positionals[0].values.kind):
            arg = c.positionals[0]
            lines.append(f"complete -c reconciler -n {condition} {_fish_values(arg.values)}")
    return "\n".join(lines) + "\n"


SCRIPTS = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}


def completion_script(shell: str, root: argparse.ArgumentParser) -> str:
    commands, top = describe(root)
    return SCRIPTS[shell](commands, top)


def cmd_completion(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.cli.main import parser  # the whole command line, built as `main` builds it

    out.write(completion_script(args.shell, parser()))
    return 0


INSTALL = """\
  source <(reconciler completion bash)                       # bash (~/.bashrc)
  reconciler completion zsh > "${fpath[1]}/_reconciler"      # zsh (a directory in $fpath)
  reconciler completion fish > ~/.config/fish/completions/reconciler.fish"""


def add_completion_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser(
        "completion",
        help="print a shell completion script: bash, zsh or fish",
        description="Print a completion script for SHELL, made from this command line itself.",
        epilog="Install it:\n" + INSTALL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    c.set_defaults(func=cmd_completion)
