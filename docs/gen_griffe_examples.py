"""Griffe extension for the API reference: make graphprune's docstrings render as intended.

* ``Example:`` sections (singular, as graphprune titles them) are read as doctest
  examples. Griffe's Google parser only knows ``Examples:``; a singular title becomes an
  admonition whose ``>>>`` lines render as nested block quotes.
* Sphinx roles (``:func:`~graphprune.trace```, ``:class:`Plan```) become optional
  cross-references: a link when the target is documented, plain code otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def _crossref(obj: griffe.Object, match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    shown = target.rpartition(".")[2] if short else target
    if "." not in target and obj.parent is not None:  # relative to the enclosing module or class
        scope = obj.parent if obj.is_function or obj.is_attribute else obj
        target = f"{scope.path}.{target}"
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _TITLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(lambda m: _crossref(obj, m), text)
