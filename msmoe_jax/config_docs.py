"""Renders the config reference (docs/configuration.md) from the dataclasses in config.py.

``python -m msmoe_jax.config_docs`` prints it, ``--write`` writes docs/configuration.md and
``--check`` exits with 1 when that file differs from what config.py gives.

Each field's description is config.py's own comment: the comment on the field's line(s),
after the comment lines directly above it (no blank line between). A comment block above a
field whose first sentence has at most three words ("MoE", "Expert view.") starts a group: it
is rendered as a heading row, and the rest of the block (if any) describes the field. A field
without a comment gets an empty description. Imports no JAX (config.py imports only yaml).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from msmoe_jax import config as config_module
from msmoe_jax.config import Config

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "python -m msmoe_jax.config_docs --write"

INTRO = """\
# Configuration

<!-- Generated from msmoe_jax/config.py by `{regenerate}`; do not edit by hand. -->

A config is a YAML file of the sections below (`configs/*.yaml`). A key a file leaves out
takes the default shown here, the dataclass's own (`configs/default.yaml` sets a larger model,
d_model 128, 4 layers with the first dense, 8 heads, and the folded layout data 2 x sequence 4
with expert 8). On the command line, `--set section.key=value` overrides one field (the value
is read as YAML; repeatable), and `python train.py --print-config` prints the resolved config.
Unknown keys, wrong types and impossible combinations stop the run at load with one line naming
the field ([training.md](training.md#errors)); the checks that need the device count
(divisibility by the parallel axes, the two views nesting) are listed in
[parallelism.md](parallelism.md#checked-at-load).

Types: `null` is YAML's null (Python's `None`); quoted values are the allowed strings.
Descriptions are the comments in `msmoe_jax/config.py`.
"""


# ---------------------------------------------------------------------------------------------
# Comments next to and above the fields


@dataclasses.dataclass
class Field:
    name: str
    type: str
    default: str
    description: str
    heading: str | None = None  # a group heading that starts at this field


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text without '#', whether the comment is alone on its line)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            own_line = tok.line[:col].strip() == ""
            out[row] = (tok.string[1:].strip(), own_line)
    return out


def _split_heading(text: str) -> tuple[str | None, str]:
    """'Expert view.' -> ('Expert view', ''); 'MoE' -> ('MoE', ''); longer text -> (None, text).
    The first sentence of a block is a heading when it has at most three words."""
    first, _, rest = text.partition(". ")
    first = first.rstrip(".")
    if len(first.split()) <= 3 and (rest or not text.rstrip(".").count(".")):
        return first, rest.strip()
    return None, text


def field_comments(cls: type) -> dict[str, tuple[str | None, str]]:
    """Field name -> (group heading or None, description) from ``cls``'s source comments."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = _comments(source)
    classdef = ast.parse(source).body[0]
    assert isinstance(classdef, ast.ClassDef), cls
    out = {}
    for stmt in classdef.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        trailing = [comments[r][0] for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                    if r in comments and not comments[r][1]]
        heading, text = None, " ".join(above)
        if text:
            heading, text = _split_heading(text)
        out[stmt.target.id] = (heading, " ".join(p for p in [text, *trailing] if p))
    return out


# ---------------------------------------------------------------------------------------------
# Types and defaults as a YAML user writes them


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(f"'{a}'" if isinstance(a, str) else repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"config field {f.name} has no default")


def fields_of(cls: type) -> list[Field]:
    hints = typing.get_type_hints(cls, vars(config_module))
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        heading, description = comments.get(f.name, (None, ""))
        rows.append(Field(f.name, type_name(tp), default_text(_default(f)), description,
                          heading))
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown


def _rst_to_md(text: str) -> str:
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _cell(text: str) -> str:
    return _rst_to_md(text).replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    out = ["| field | type | default | description |", "|---|---|---|---|"]
    for f in fields_of(cls):
        if f.heading:
            out.append(f"| *{_cell(f.heading)}* | | | |")
        out.append(f"| `{prefix}{f.name}` | `{_cell(f.type)}` | `{_cell(f.default)}` | "
                   f"{_cell(f.description)} |")
    return out


def render() -> str:
    """The whole docs/configuration.md."""
    out = [INTRO.format(regenerate=REGENERATE)]
    out += ["## Top level", ""] + _table(Config, "") + [""]
    hints = typing.get_type_hints(Config, vars(config_module))
    for f in dataclasses.fields(Config):
        cls: Any = hints[f.name]
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue
        out += [f"## {f.name}", "", f"`{cls.__name__}` in `msmoe_jax/config.py`.", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [_rst_to_md(" ".join(inspect.cleandoc(cls.__doc__).split())), ""]
        out += _table(cls, f"{f.name}.") + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m msmoe_jax.config_docs",
        description="Render the config reference (docs/configuration.md) from msmoe_jax/config.py.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    g.add_argument("--check", action="store_true",
                   help=f"exit with 1 if {DOC_PATH.name} is not what config.py gives")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text)
    elif args.check:
        current = DOC_PATH.read_text() if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date; run: {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
