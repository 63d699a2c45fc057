"""Every config key with its documentation, read from the comments of ``schema.py``.

``schema.py`` documents each field by a trailing comment (and, for longer notes, comment
lines just above it). Those comments are the one place a field is documented (STYLE 12),
so they are parsed here at run time (`ast` for the fields, `tokenize` for the comments)
rather than copied into ``field(metadata=...)``: the schema stays as readable as it is, and
a field added with a comment is documented in ``--help-config`` with no second edit.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import schema


@dataclass(frozen=True)
class KeyDoc:
    """One leaf config key: ``key`` dotted (``sampling.num_steps``), its annotation as written
    in ``schema.py``, its default and its documentation."""

    key: str
    type: str
    default: Any
    doc: str


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment text on that line (without ``#``)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens
            if tok.type == tokenize.COMMENT}


@cache
def _schema_docs() -> dict[str, dict[str, tuple[str, str]]]:
    """Class name -> field name -> (annotation text, doc) for every dataclass of the schema."""
    source = inspect.getsource(schema)
    comments = _comments(source)
    lines = source.splitlines()
    result: dict[str, dict[str, tuple[str, str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, tuple[str, str]] = {}
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above = []
                row = item.lineno - 1
                # Comment-only lines just above the field belong to it.
                while row in comments and lines[row - 1].lstrip().startswith("#"):
                    above.insert(0, comments[row])
                    row -= 1
                trailing = [comments[r] for r in range(item.lineno, item.end_lineno + 1)
                            if r in comments]
                doc = " ".join(above + trailing).strip()
                fields[item.target.id] = (ast.get_source_segment(source, item.annotation) or "", doc)
        result[node.name] = fields
    return result


def class_doc(cls: type) -> str:
    """The first line of a config dataclass's docstring ('' when it has none)."""
    doc = (cls.__dict__.get("__doc__") or "").strip()
    if not doc or doc.startswith(f"{cls.__name__}("):  # the signature dataclass writes
        return ""
    return doc.splitlines()[0]


def field_doc(cls: type, name: str) -> str:
    """The documentation of field ``name`` of schema dataclass ``cls`` ('' if undocumented);
    a section (a dataclass-typed field) is documented by its class docstring."""
    doc = _schema_docs().get(cls.__name__, {}).get(name, ("", ""))[1]
    tp = typing.get_type_hints(cls).get(name)
    if not doc and dataclasses.is_dataclass(tp):
        return class_doc(tp)
    return doc


def _default(f: dataclasses.Field) -> Any:
    from .loader import to_dict

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return None


def config_keys(cls: type = schema.RunConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key under ``cls`` (nested dataclasses expanded), in schema order."""
    hints = typing.get_type_hints(cls)
    keys: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(config_keys(tp, f"{dotted}."))
            continue
        annotation = _schema_docs().get(cls.__name__, {}).get(f.name, ("", ""))[0]
        keys.append(KeyDoc(dotted, annotation, _default(f), field_doc(cls, f.name)))
        item = (typing.get_args(tp) or (None,))[0]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item):
            keys.extend(config_keys(item, f"{dotted}[]."))  # each list entry's keys
    return keys


def format_reference() -> str:
    """The text ``flowdppo train --help-config`` prints: one block per section."""
    out = ["Config keys (set in a recipe YAML or as KEY=VALUE overrides, e.g. optim.lr=1e-4)."]
    hints = typing.get_type_hints(schema.RunConfig)
    section = None
    for key in config_keys():
        head = key.key.split(".")[0] if "." in key.key else ""
        if head != section:
            section = head
            title = class_doc(hints[head]) if head else "top-level run settings"
            out += ["", f"[{head or 'run'}] {title}".rstrip()]
        out.append(f"  {key.key}: {key.type} = {key.default!r}")
        out.append(textwrap.fill(key.doc, width=96, initial_indent=" " * 6,
                                 subsequent_indent=" " * 6))
    return "\n".join(out).strip() + "\n"
