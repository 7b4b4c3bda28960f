"""Command-line flags generated from a dataclass, and a JSON file that sets their defaults.

Every field ``some_name`` becomes ``--some-name``:

* ``bool`` -> ``--some-name`` / ``--no-some-name`` (``argparse.BooleanOptionalAction``);
* ``int``, ``float``, ``str`` -> a value of that type; ``X | None`` (``Optional[X]``) of a number also accepts
  ``none``; ``Literal[...]`` -> those choices;
* the field's ``metadata`` may give ``help`` (the flag's help), ``choices``, ``type`` (an argparse ``type=`` that
  replaces the one from the annotation) and ``metavar``.

The flags default to ``argparse.SUPPRESS``: a flag that is not given leaves no attribute, so :func:`given` tells
the command line's values apart and a ``--config`` file (:func:`read_config`) can set the defaults between the
dataclass's own and the command line's. The help shows the dataclass's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ._common import UsageError, need_file

_METAVARS = {int: "N", float: "X"}


def _unwrap_optional(hint) -> tuple[Any, bool]:
    """(X, True) for ``X | None`` / ``Optional[X]``; (hint, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _or_none(parse):
    """An argparse ``type=`` that also accepts ``none`` (-> None)."""

    def parse_or_none(text: str):
        return None if text.strip().lower() == "none" else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")
    return parse_or_none


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_flag(f: dataclasses.Field, hint, owner: str = "") -> tuple[list[str], dict[str, Any]]:
    """(option strings, ``add_argument`` keywords) of the flag of one dataclass field ``f`` annotated ``hint``."""
    meta = f.metadata
    base, optional = _unwrap_optional(hint)
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    if base is bool and "type" not in meta:
        kw["action"] = argparse.BooleanOptionalAction
    elif "type" in meta:
        kw["type"] = meta["type"]
    elif typing.get_origin(base) is Literal:
        kw["choices"] = typing.get_args(base)
        kw["type"] = type(kw["choices"][0])
    elif base in (int, float, str):
        kw["type"] = base
    else:
        raise TypeError(f"{owner}.{f.name}: no command-line flag for the type {hint!r}; give metadata['type']")
    if "choices" in meta:
        kw["choices"] = tuple(meta["choices"])
    takes_none = optional and "type" in kw and base is not str  # a str flag takes "none" as a name
    if takes_none:
        kw["type"] = _or_none(kw["type"])
    metavar = meta.get("metavar", _METAVARS.get(base))
    if metavar is not None and "action" not in kw and "choices" not in kw:
        kw["metavar"] = f"{metavar}|none" if takes_none else metavar
    default = _default(f)
    text = str(meta.get("help", "")).replace("%", "%%")
    if default is dataclasses.MISSING:
        text += " (required)"
    elif default is not None or takes_none:
        text += f" (default: {_shown(default)})"
    kw["help"] = text.strip()
    return [f"--{f.name.replace('_', '-')}"], kw


def add_dataclass_arguments(parser, cls, *, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """One flag per field of the dataclass ``cls`` (see the module docstring) on ``parser`` (or an argument
    group). ``aliases`` maps field names to further option strings (e.g. ``{"max_steps": ["--steps"]}``)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls must be a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        options, kw = field_flag(f, hints[f.name], cls.__name__)
        parser.add_argument(*options, *(aliases or {}).get(f.name, ()), **kw)


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The fields of ``cls`` set on the command line (flags made by :func:`add_dataclass_arguments`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def read_config(path: Path, classes: Sequence[type], aliases: Mapping[str, str] | None = None,
                flag: str = "--config") -> list[dict[str, Any]]:
    """Split a JSON object of settings into one dict per dataclass of ``classes``.

    Keys are field names, with dashes or underscores; ``aliases`` maps other accepted keys to field names
    (e.g. ``{"steps": "max_steps"}``). Unknown keys raise :class:`UsageError` naming them.
    """
    path = need_file(Path(path), f"{flag} file")
    from crfrnn.engine.runfiles import read_config_json

    try:
        raw = read_config_json(path, what=flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = (aliases or {}).get(name, name)
        if name in settings:
            raise UsageError(f"{flag} {path} sets {name} twice (key {key!r})")
        settings[name] = value
    names = [{f.name for f in dataclasses.fields(c)} for c in classes]
    unknown = sorted(k for k in settings if not any(k in n for n in names))
    if unknown:
        raise UsageError(f"{flag} {path}: unknown key(s) {', '.join(unknown)}")
    return [{k: v for k, v in settings.items() if k in n} for n in names]
