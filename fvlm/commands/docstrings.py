"""Docstrings in the terminal (``fvlm info``, ``fvlm run --help``).

fvlm's docstrings are Markdown with mkdocstrings cross-references (``[`prune`][fvlm.prune]``) and
Google-style sections (``Args:``, ``Returns:``); a plugin's may use reST code spans and Sphinx
roles instead. Both become Markdown a terminal can render: references and roles turn into code
spans of the short name, and the ``Args`` section is split off so that a command can show it as a
table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# [`name`][fvlm.x.name] or [text][fvlm.x]: mkdocstrings cross-references
_REFERENCE = re.compile(r"\[([^\[\]]+)\]\[[\w.]*\]")
# :func:`~fvlm.x.name`, :class:`Name <fvlm.x.Name>`: Sphinx roles
_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]*?)(?:\s*<[^`>]*>)?`")
_DOUBLE = re.compile(r"``(.+?)``")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")


def markdown(text: str) -> str:
    """``text`` with cross-references and roles as code spans of their names, reST ``x`` as `x`."""
    text = _REFERENCE.sub(r"\1", text)
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return _DOUBLE.sub(lambda m: f"`{m.group(1)}`", text)


def plain(text: str) -> str:
    """``text`` as one line of plain text: Markdown (see [`markdown`][fvlm.commands.docstrings.markdown]) without backticks."""
    return " ".join(markdown(text).replace("`", "").split())


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` as plain text (an ``e.g.`` does not end it)."""
    return _SENTENCE_END.split(plain(text), maxsplit=1)[0]


@dataclass
class Docstring:
    """A docstring split for the terminal: the Markdown ``body`` and the ``Args`` entries by name."""

    body: str
    args: dict[str, str] = field(default_factory=dict)


def split(doc: str) -> Docstring:
    """``doc`` (already dedented) without its ``Args:`` / ``Parameters:`` section, which becomes ``args``."""
    lines = doc.strip("\n").splitlines()
    body: list[str] = []
    args: dict[str, str] = {}
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("Args:", "Arguments:", "Parameters:"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            i += 1
            name = None
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                entry = re.match(r"\s*([\w*]+)(?:\s*\(([^)]*)\))?:\s*(.*)", lines[i])
                level = len(lines[i]) - len(lines[i].lstrip())
                if entry and (name is None or level <= entry_level):
                    name, entry_level = entry.group(1).lstrip("*"), level
                    args[name] = entry.group(3)
                elif name is not None and lines[i].strip():
                    args[name] += " " + lines[i].strip()
                i += 1
            continue
        body.append(lines[i])
        i += 1
    return Docstring(markdown("\n".join(body).strip()), {k: " ".join(markdown(v).split()) for k, v in args.items()})
