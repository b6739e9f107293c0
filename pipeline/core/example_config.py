"""``pipeline/configs/example.yaml``, generated from the config dataclasses, so it lists every key.

Keys, defaults and sections come from ``JobConfig``'s fields; each comment is the field's own comment
in ``config.py`` (on its line, or the lines just above it), and a section's heading is its class
docstring's first line. A test compares the shipped file with this output. Regenerate it with
``python -m pipeline.core.example_config > pipeline/configs/example.yaml``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Literal

import yaml

from pipeline.core.config import JobConfig

EXAMPLE = Path(__file__).parent.parent / "configs" / "example.yaml"
HEADER = """\
# An imagetune job: `imagetune run --config example.yaml [--set section.key=value ...]`.
# Every key is listed; all but input and output are optional, and the values below are the defaults.
# Generated from pipeline/core/config.py: python -m pipeline.core.example_config > pipeline/configs/example.yaml
"""
# Values for the required keys, which have no default.
REQUIRED = {"input": "s3://my-bucket/shards/", "output": "s3://my-bucket/curated/"}
COMMENT_COLUMN = 38


def example_yaml() -> str:
    """The example configuration: every key of ``JobConfig`` with its default and its comment."""
    comments = field_comments(JobConfig)
    lines = [HEADER.rstrip("\n")]
    sections = []
    for field in dataclasses.fields(JobConfig):
        default = _default(field)
        if dataclasses.is_dataclass(default):
            sections.append((field.name, default))
        else:
            lines += _entry(field.name, REQUIRED.get(field.name, default), comments.get(field.name), "")
    for name, section in sections:
        heading = inspect.getdoc(type(section)).splitlines()[0].replace("``", "`")
        lines += ["", f"{name}:  # {heading}"]
        section_comments = field_comments(type(section))
        for field in dataclasses.fields(section):
            lines += _entry(field.name, getattr(section, field.name), section_comments.get(field.name), "  ")
    return "\n".join(lines) + "\n"


def field_comments(cls: type) -> dict[str, tuple[list[str], str]]:
    """Each field's comments in ``cls``'s source: the lines just above it, and the one on its line
    (after the choices of a ``Literal``)."""
    source = textwrap.dedent(inspect.getsource(cls))
    by_line: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    comments: dict[str, tuple[list[str], str]] = {}
    hints = typing.get_type_hints(cls)
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in by_line and line not in code_lines:
                above.insert(0, by_line[line])
                line -= 1
            beside = by_line.get(node.end_lineno, "")
            if typing.get_origin(hints[node.target.id]) is Literal:  # the choices, always beside
                choices = " | ".join(map(str, typing.get_args(hints[node.target.id])))
                beside = f"{choices}; {beside}" if beside else choices
            comments[node.target.id] = (above, beside)
    return comments


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _entry(name: str, value, comments: tuple[list[str], str] | None, indent: str) -> list[str]:
    """``name: value`` with the field's comments: those above it above, the one on its line beside."""
    above, beside = comments or ([], "")
    line = f"{indent}{name}: {_scalar(value)}"
    return [f"{indent}# {text}" for text in above] + [f"{line:<{COMMENT_COLUMN}} # {beside}" if beside else line]


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


if __name__ == "__main__":
    sys.stdout.write(example_yaml())
