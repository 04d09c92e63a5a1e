"""What ``gptx components`` shows: every registered component with its kind, plugin,
capabilities and options (type, default, and the comment its source gives the option)."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from gptx.errors import GptxError
from gptx.kinds import BY_NAME, KINDS
from gptx.options import did_you_mean, range_of, type_name


def select(reg, what):
    """The entries to show: all, one kind's, or the components named ``what`` (of any kind)."""
    if what is None:
        return [e for k in KINDS for e in sorted(reg.entries[k.name].values(), key=lambda e: e.name)]
    if what in BY_NAME:
        return sorted(reg.entries[what].values(), key=lambda e: e.name)
    named = [reg.entries[k.name][what] for k in KINDS if what in reg.entries[k.name]]
    if named:
        return named
    choices = list(BY_NAME) + [n for k in KINDS for n in reg.entries[k.name]]
    raise GptxError(f"'{what}' is neither a component kind nor a registered component{did_you_mean(what, choices)}; "
                    f"kinds: {', '.join(BY_NAME)}")


def describe(entry) -> dict:
    kind = BY_NAME[entry.kind]
    return {
        "kind": entry.kind,
        "name": entry.name,
        "table": kind.table,
        "plugin": entry.plugin.name,
        "distribution": entry.plugin.distribution,
        "version": entry.plugin.version,
        "supports": sorted(entry.supports),
        "overrides": entry.overrides.name if entry.overrides else None,
        "class": f"{entry.cls.__module__}.{entry.cls.__qualname__}",
        "doc": (inspect.getdoc(entry.cls) or "").split("\n\n")[0].replace("\n", " "),
        "options": options_of(entry.cls.Options),
    }


def options_of(options_cls) -> list[dict]:
    """Each settable option: name, type, default and the comment beside it in the source."""
    hints = typing.get_type_hints(options_cls)
    comments = _field_comments(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        accepted = range_of(f, hints[f.name])
        out.append({"name": f.name, "type": type_name(hints[f.name]) + (f" in {accepted}" if accepted else ""), "default": default,
                    "doc": comments.get(f.name, "")})
    return out


def _field_comments(options_cls) -> dict[str, str]:
    comments = {}
    for cls in reversed(options_cls.__mro__):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def table(rows: list[dict], detailed: bool) -> str:
    """One line per component; with ``detailed``, its description and options below it."""
    if not rows:
        return "(none registered)"
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        extra = f"  (overrides {r['overrides']})" if r["overrides"] else ""
        origin = f"{r['plugin']} ({r['distribution']} {r['version']})"
        lines.append(f"{r['kind']:<15} {r['name']:<{width}}  {origin:<44} {','.join(r['supports']) or '-'}{extra}")
        if detailed:
            where = f'[{r["table"]}] kind = "{r["name"]}"' if r["table"] else "named by another component's option"
            lines.append(f"    {r['doc']}" if r["doc"] else "")
            lines.append(f"    {where}; class {r['class']}")
            for o in r["options"]:
                doc = f"  # {o['doc']}" if o["doc"] else ""
                lines.append(f"    {o['name']} = {_toml(o['default'])}  ({o['type']}){doc}")
            lines.append("")
    return "\n".join(line for line in lines).rstrip()


def _toml(value) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return repr(value)
