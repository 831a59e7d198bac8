"""Error texts an administrator can act on: YAML syntax errors and unknown keys.

Why a module of its own: PyYAML words its errors for parser writers ("expected <block end>,
but found '<block mapping start>'") and, for an unclosed quote or bracket, points at the end
of the file instead of where the quote was opened; pydantic says "Extra inputs are not
permitted" for a typo.  The loader (:func:`rtcontrast.settings.node.read_yaml`,
:func:`~rtcontrast.settings.node.load_yaml_model`) turns both into one sentence at the line
to edit, with a "did you mean" from :mod:`difflib` for a misspelt key.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel

__all__ = ["yaml_error", "suggest_key", "fields_at"]

# (PyYAML problem text starts with, use the context line?, plain words)
_YAML_HINTS: tuple[tuple[str, bool, str], ...] = (
    ("could not find expected ':'", True,
     "a line that is neither 'key: value' nor a list item (missing ':' after the key?)"),
    ("mapping values are not allowed here", False,
     "unexpected ':' - this key is indented deeper than the key above it, or a value holding ': ' needs quotes"),
    ("expected <block end>, but found", False,
     "bad indentation - this line starts in a different column from the keys of its block above "
     "(indent with spaces, the same number for every key of one block)"),
    ("did not find expected key", False,
     "bad indentation - this line does not line up with the keys of its block (or a '- ' item is out of place)"),
    ("did not find expected '-' indicator", False,
     "bad indentation - a list item must start with '- ' in the same column as the items above"),
    ("found character '\\t' that cannot start any token", False,
     "a tab character: YAML indents with spaces only"),
    ("found a tab character", False, "a tab character: YAML indents with spaces only"),
    ("found unexpected end of stream", True, "the file ends inside a value opened here (an unclosed quote?)"),
    ("expected ',' or '}'", True, "a '{' opened here is not closed with '}' (or an item lacks a ',')"),
    ("expected ',' or ']'", True, "a '[' opened here is not closed with ']' (or an item lacks a ',')"),
    ("found undefined alias", False, "'*' starts an alias in YAML: quote the value"),
    ("found character '@' that cannot start any token", False, "a value starting with '@' must be quoted"),
    ("found character '`' that cannot start any token", False, "a value starting with '`' must be quoted"),
)


def yaml_error(name: str, exc: yaml.YAMLError) -> str:
    """``file:line: YAML syntax error: <plain words> (column C)`` for a PyYAML error.

    The line is the one to edit: where an unclosed quote or bracket was opened, or where
    a key without ':' sits (PyYAML notices both only a line or more later).
    """
    problem = str(getattr(exc, "problem", None) or exc).strip()
    mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    text = f"{problem}"
    use_context = False
    context_text = str(getattr(exc, "context", None) or "")
    for start, ctx_line, words in _YAML_HINTS:
        if problem.startswith(start):
            text, use_context = words, ctx_line
            if "quoted scalar" in context_text:
                text = "a quote opened here is never closed"
            break
    else:
        context = getattr(exc, "context", None)
        if context:
            text = f"{problem} ({context})"
    where = context_mark if (use_context and context_mark is not None) else (mark or context_mark)
    if where is None:
        return f"{name}:1: YAML syntax error: {text}"
    return f"{name}:{where.line + 1}: YAML syntax error: {text} (column {where.column + 1})"


def _unwrap(tp: Any) -> Any:
    """The model class inside Optional[...], list[...], dict[str, ...] (or None)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(tp):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def fields_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys a mapping at ``loc`` (a path inside ``model``) accepts; [] when unknown.

    List indices and the keys of free-form dicts (e.g. destination names) are skipped over.
    """
    current: Any = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        ann = fields[part].annotation
        nxt = _unwrap(ann)
        if nxt is None:
            return []
        if typing.get_origin(ann) is dict or any(typing.get_origin(a) is dict for a in typing.get_args(ann)):
            if parts and isinstance(parts[0], str):
                parts.pop(0)  # a dict key chosen by the user (destination name)
        current = nxt
    return list(getattr(current, "model_fields", {}))


def suggest_key(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    """``" (did you mean 'port'?)"`` for an unknown key at ``loc``, or ``" (known: a, b, c)"``."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    known = fields_at(model, loc[:-1])
    if not known:
        return ""
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    if not close:
        want = loc[-1].lower().replace("-", "_")
        close = [k for k in known if k.lower() == want]
        prefixed = [k for k in known if len(want) >= 2 and (k.startswith(want) or want.startswith(k))]
        close = close or (prefixed if len(prefixed) == 1 else [])
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known keys here: {', '.join(known)})"
