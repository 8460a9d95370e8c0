"""The tensors of a saved record: shapes, dtypes and ties, and how two records differ.

Example:
    >>> import torch
    >>> weight = torch.zeros(2, 3)
    >>> stored, tied = split_tied({"a": weight, "b": weight})
    >>> sorted(stored), tied, tensor_record(stored)["a"]
    (['a'], {'b': 'a'}, {'shape': [2, 3], 'dtype': 'float32'})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, as the record writes it."""
    return str(dtype).removeprefix("torch.")


def tensor_record(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every entry, and ``requires_grad`` of every parameter (a frozen backbone stays frozen)."""
    record = {}
    for name, tensor in state.items():
        entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
        if isinstance(tensor, nn.Parameter):
            entry["requires_grad"] = bool(tensor.requires_grad)
        record[name] = entry
    return record


def shapes_only(record: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The record without dtypes: a rebuilt base is float32 until :func:`load` casts it."""
    return {k: {"shape": list(v["shape"]), "dtype": "any"} for k, v in record.items()}


def split_tied(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (contiguous, sharing no memory) and ``{alias: stored name}`` for tied ones."""
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    used_storage: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen_views:
            tied[name] = seen_views[view]
            continue
        seen_views[view] = name
        data = tensor.cpu().contiguous()
        storage = data.untyped_storage().data_ptr()
        if data.numel() and storage in used_storage:  # overlapping views of one buffer
            data = data.clone()
        used_storage.add(data.untyped_storage().data_ptr())
        stored[name] = data
    return stored, tied


def shape_differences(expected: Mapping[str, Mapping[str, Any]], actual: Mapping[str, Mapping[str, Any]],
                       *, limit: int = 3) -> list[str]:
    """What differs between two tensor records (missing, unexpected, other shape or dtype), at most ``limit`` each.

    Example:
        >>> shape_differences({"w": {"shape": [2], "dtype": "any"}}, {"w": {"shape": [3], "dtype": "any"}})
        ['w: (3,) any instead of (2,) any']
    """
    problems = []
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing:
        problems.append(f"missing {missing[:limit]}{' ...' if len(missing) > limit else ''}")
    if extra:
        problems.append(f"unexpected {extra[:limit]}{' ...' if len(extra) > limit else ''}")
    changed = [f"{k}: {tuple(actual[k]['shape'])} {actual[k]['dtype']} instead of "
               f"{tuple(expected[k]['shape'])} {expected[k]['dtype']}"
               for k in expected if k in actual and dict(actual[k]) != dict(expected[k])]
    problems += changed[:limit] + (["..."] if len(changed) > limit else [])
    return problems
