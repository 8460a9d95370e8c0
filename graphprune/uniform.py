"""Uniform plans: every layer of one kind loses the same number of channels.

A Hugging Face config holds one width per kind of layer (``intermediate_size``,
``num_attention_heads``), so a pruned model can be rebuilt by ``from_pretrained`` only if
all its decoder layers were cut alike. Groups are of one *kind* when their members are the
same parameters up to the layer index (``layers.3.mlp.up_proj.weight`` and
``layers.5.mlp.up_proj.weight``) with the same sizes; :func:`uniform_selection` removes from
each the same count, the smallest any of them would lose, each group choosing its own
lowest-scoring channels. Which channels go may differ per layer: the config holds counts,
not indices.

Where the config cannot hold fewer heads of the same size (BERT, GPT-2: the head size is
``hidden_size // num_attention_heads``; see :func:`graphprune.hf_contract.holds_head_dim`),
attention heads are kept and only the other groups (MLP widths) are cut.

Example:
    >>> import torch, transformers, graphprune as gp
    >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaModel(config).eval()
    >>> small = prune_uniform(model, torch.randint(0, 50, (1, 6)), ratio=0.5)
    >>> small.config.num_attention_heads, small.config.num_key_value_heads, small.config.intermediate_size
    (2, 1, 32)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import hf_contract
from .errors import PruneError
from .groups import ChannelGroup, Groups, find_groups
from .history import record_plan
from .inputs import ExampleInputs, as_args
from .plan import make_plan
from .selection import select_channels
from .scoring import get_scorer
from .scoring.registry import Scorer
from .tracer import trace
from .verify import apply_verified_

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def group_kind(group: ChannelGroup) -> tuple:
    """What a group is up to the layer index: its members' names (indices as ``#``), dims and sizes.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> group_kind(gp.find_groups(gp.trace(net, torch.randn(1, 4)))[0])[1]
        ('#.weight', 0, 8)
    """
    members = tuple((_LAYER_INDEX.sub("#", m.name), m.dim, int(m.channel.size)) for m in group.members)
    return (group.size,) + members


def uniform_selection(groups: Groups, scores: Mapping[int, torch.Tensor], *, ratio: float,
                      keep_heads: bool = False) -> dict[int, tuple[int, ...]]:
    """A local selection at ``ratio`` in which all groups of one kind lose the same count.

    Args:
        groups: from :func:`graphprune.find_groups`.
        scores: group id -> one score per channel (lower is removed first).
        ratio: fraction of each group's channels to remove, in ``[0, 1)``.
        keep_heads: remove nothing from groups whose channels span several indices
            (attention heads), for configs that cannot hold fewer heads.

    Returns:
        group id -> removed channels, for ``make_plan(groups, removed=...)``.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = gp.find_groups(gp.trace(net, torch.randn(1, 4)))
        >>> uniform_selection(groups, {groups[0].id: torch.arange(8.0)}, ratio=0.25)
        {0: (0, 1)}
    """
    local = select_channels(groups, scores, ratio=ratio)
    kinds: dict[tuple, list[ChannelGroup]] = {}
    for group in groups.all:
        kinds.setdefault(group_kind(group), []).append(group)
    chosen: dict[int, tuple[int, ...]] = {}
    for members in kinds.values():
        count = min(len(local.get(g.id, ())) for g in members)
        if count == 0 or (keep_heads and any(int(g.width.max()) > 1 for g in members)):
            continue
        for group in members:
            score = torch.as_tensor(scores[group.id], dtype=torch.float64).flatten()
            lowest = sorted(local[group.id], key=lambda c: (float(score[c]), c))[:count]
            chosen[group.id] = tuple(sorted(lowest))
    return chosen


def prune_uniform(model: nn.Module, example_inputs: ExampleInputs = None, *, ratio: float,
                  scorer: str | Scorer = "l1", scorer_options: Mapping[str, Any] | None = None,
                  ignore: Iterable[str] = ()) -> nn.Module:
    """:func:`graphprune.prune` with a uniform plan; a Hugging Face model's config follows.

    The pruned copy's config reproduces every parameter shape
    (:func:`graphprune.hf_contract.config_mismatches` is empty), so it survives
    ``save_pretrained`` -> ``from_pretrained``. A kind of group whose removal the config
    cannot describe (GPT-2's residual width: its head size is ``n_embd // n_head``) is left
    whole and the plan applied again, at most :data:`_ATTEMPTS` times.

    Args:
        model: any ``nn.Module``; the input model is not modified.
        example_inputs: as for :func:`graphprune.prune` (token ids for a language model).
        ratio: fraction of each group's channels to remove, in ``[0, 1)``.
        scorer: a registered scorer name or a callable.
        scorer_options: keyword arguments for the scorer.
        ignore: module names whose parameters keep every channel.

    Raises:
        PruneError: if the pruned model does not run, or its config cannot describe it.

    Example:
        >>> import torch, graphprune as gp
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> prune_uniform(net, torch.randn(1, 4), ratio=0.5)[0].out_features
        4
    """
    score_fn = get_scorer(scorer)
    traced = copy.deepcopy(model)
    args = as_args(traced, example_inputs)
    groups = find_groups(trace(traced, args), ignore=ignore, model=traced)
    scores = score_fn(groups, traced, **dict(scorer_options or {}))
    hf = hf_contract.is_hf_model(traced)
    keep_heads = hf and not hf_contract.holds_head_dim(traced.config)
    removed = uniform_selection(groups, scores, ratio=ratio, keep_heads=keep_heads)
    for _ in range(_ATTEMPTS):
        pruned, bad = _apply_uniform(model, groups, removed, args, hf)
        if not bad:
            return pruned
        kinds = {group_kind(groups.by_id(gid)) for gid in removed
                 if any(m.name in bad for m in groups.by_id(gid).members)}
        removed = {gid: ch for gid, ch in removed.items() if group_kind(groups.by_id(gid)) not in kinds}
    raise PruneError("the pruned model's config cannot describe it: " + "; ".join(sorted(bad)[:5]))


_ATTEMPTS = 3


def _apply_uniform(model: nn.Module, groups: Groups, removed: dict, args: tuple, hf: bool) -> tuple[nn.Module, set]:
    """Apply ``removed`` to a fresh copy; (the copy, parameters its config does not reproduce)."""

    pruned = copy.deepcopy(model)
    applied, dropped = apply_verified_(pruned, groups, make_plan(groups, removed=removed), args)
    if dropped:
        raise PruneError(f"groups {sorted(dropped)} break the model when pruned, so the plan is not uniform: "
                         f"{dropped}; pass their modules in ignore=")
    record_plan(pruned, applied)
    return pruned, set(hf_contract.mismatched_parameters(pruned)) if hf else set()
