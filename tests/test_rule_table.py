"""The coupling-rule tables are exact: every key names a torch callable, and no key is taken twice."""

from __future__ import annotations

import pytest
import torch

from graphprune.rules import RULES, register_rule
from graphprune.rules.layout import SHORTCUTS
from graphprune.rules.names import spellings, torch_callable


def _builtin(table: dict) -> dict:
    """The entries graphprune's own rule modules registered (tests and docs may add their own)."""
    return {name: fn for name, fn in table.items() if fn.__module__.startswith("graphprune.rules")}


@pytest.mark.parametrize("table", [RULES, SHORTCUTS], ids=["rules", "layout shortcuts"])
def test_every_key_names_a_torch_callable(table: dict) -> None:
    keys = _builtin(table)
    assert len(keys) > 40
    assert [name for name in keys if torch_callable(name) is None] == []


def test_spellings_that_name_nothing_are_not_keys() -> None:
    assert "torch.Tensor.__radd__" in RULES and "torch.add" in RULES
    for name in ("torch.nn.functional.add", "torch.special.relu", "torch.Tensor.__sum__", "torch.float"):
        assert name not in RULES, name
    assert "torch.Tensor.float" in spellings("float") and "torch.float" not in spellings("float")  # a dtype


def test_keys_are_the_names_the_tracer_sees() -> None:
    """``resolve_name`` (the tracer's key) of the functions models call is a key of the table."""
    resolve = torch.overrides.resolve_name
    for fn in (torch.add, torch.Tensor.add, torch.Tensor.__radd__, torch.nn.functional.relu, torch.Tensor.sum,
               torch.Tensor.__rmatmul__, torch.nn.functional.batch_norm, torch.Tensor.reshape, torch.cat):
        assert resolve(fn) in RULES, resolve(fn)
    assert resolve(torch.Tensor.reshape) in SHORTCUTS


def test_a_taken_name_is_refused_and_nothing_of_the_batch_registered() -> None:
    before = dict(RULES)
    with pytest.raises(ValueError, match="'torch.add' is already registered"):
        register_rule("mylib.fresh_name", "torch.add")(lambda ctx, call: [])
    assert RULES == before


def test_layout_shortcuts_refuse_a_taken_name() -> None:
    from graphprune.rules import layout

    before = dict(SHORTCUTS)
    with pytest.raises(ValueError, match="layout shortcut for 'torch.Tensor.reshape'"):
        layout._shortcut("torch.Tensor.reshape")(lambda ctx, call: None)
    assert SHORTCUTS == before
