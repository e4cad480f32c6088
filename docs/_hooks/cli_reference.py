"""MkDocs hook: the command-line reference is written from the argparse parsers at build time.

A page holding ``<!-- cli: edgepack -->`` or ``<!-- cli: runtime_shim -->`` gets, in its place, one
section per command (nested subcommands included): the description, the usage line and a table of
every option with its help and default. The parsers are the only source, so the page cannot drift.
"""

from __future__ import annotations

import argparse
import html
import re

MARKER = re.compile(r"<!--\s*cli:\s*(edgepack|runtime_shim)\s*-->")


def _parser(name: str) -> argparse.ArgumentParser:
    if name == "edgepack":
        from edgepack.cli import make_parser
    else:
        from runtime_shim.__main__ import make_parser
    return make_parser()


def _cell(text: str) -> str:
    return html.escape(" ".join(text.split())).replace("|", "&#124;").replace("[", "&#91;")


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name), sub


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            flags = ", ".join(action.option_strings)
            if action.nargs != 0:
                flags += " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
        else:
            flags = formatter._format_args(action, formatter._get_default_metavar_for_positional(action))
        help_text = formatter._expand_help(action) if action.help else ""
        default = action.default
        shown = "" if default in (None, False, argparse.SUPPRESS) or action.nargs == 0 or not action.option_strings \
            or "default" in help_text else f"<code>{_cell(str(default))}</code>"
        rows.append(f"| <code>{_cell(flags)}</code> | {_cell(help_text)} | {shown} |")
    if not rows:
        return []
    return ["| argument | what it does | default |", "|---|---|---|", *rows, ""]


def _section(prog: str, parser: argparse.ArgumentParser, help_line: str | None, level: int) -> list[str]:
    out = [f"{'#' * level} `{prog}`", ""]
    text = parser.description or help_line
    if text:
        out += [" ".join(text.split()).replace("[", "\\["), ""]
    usage = parser.format_usage().removeprefix("usage: ").strip()
    out += ["```text", usage, "```", ""]
    out += _options_table(parser)
    if parser.epilog:
        out += ["```text", parser.epilog.strip(), "```", ""]
    for name, sub_help, sub in _subcommands(parser):
        out += _section(f"{prog} {name}", sub, sub_help, min(level + 1, 4))
    return out


def render(name: str) -> str:
    parser = _parser(name)
    prog = "edgepack" if name == "edgepack" else "python -m runtime_shim"
    parser.prog = prog
    lines = []
    if parser.description:
        lines += [" ".join(parser.description.split()).replace("[", "\\["), ""]
    if parser.epilog:
        lines += ["```text", parser.epilog.strip(), "```", ""]
    for sub_name, sub_help, sub in _subcommands(parser):
        sub.prog = f"{prog} {sub_name}"
        lines += _section(f"{prog} {sub_name}", sub, sub_help, 3)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001  (MkDocs' hook signature)
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
