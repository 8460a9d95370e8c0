"""One call: trace, group, score, plan, remove, verify.

``prune`` is a thin wrapper over the public verbs; use them directly to inspect or
customize any stage.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ._runtime import paused_gc
from .budget import check_target, plan_for_flops
from .errors import InvalidArgumentError
from .groups import Groups, check_ignore, find_groups
from .history import record_plan
from .inputs import ExampleInputs, as_examples
from .latency.config import LatencyConfig
from .latency.select import plan_for_latency
from .plan import make_plan
from .selection import PlanConfig
from .removal import apply_plan_
from .scoring import get_scorer
from .scoring.registry import Scorer
from .tracer import trace
from .verify import apply_verified_, check_coverage

__all__ = ["prune", "prune_"]


def prune_(model: nn.Module, example_inputs: ExampleInputs = None, *, ratio: float | None = None,
           flops_reduction: float | None = None, scorer: str | Scorer = "l1",
           scorer_options: Mapping[str, Any] | None = None, ignore: Iterable[str] = (),
           config: PlanConfig | None = None, round_to: int | None = None, latency_reduction: float | None = None,
           latency_config: LatencyConfig | None = None) -> nn.Module:
    """Prune ``model`` in place; see :func:`prune` (same arguments). On error the model is unchanged."""
    with paused_gc():
        return _prune_(model, example_inputs, ratio=ratio, flops_reduction=flops_reduction, scorer=scorer,
                       scorer_options=scorer_options, ignore=ignore, config=config, round_to=round_to,
                       latency_reduction=latency_reduction, latency_config=latency_config)


def _prune_(model: nn.Module, example_inputs: ExampleInputs, *, ratio: float | None, flops_reduction: float | None,
            scorer: str | Scorer, scorer_options: Mapping[str, Any] | None, ignore: Iterable[str],
            config: PlanConfig | None, round_to: int | None, latency_reduction: float | None = None,
            latency_config: LatencyConfig | None = None) -> nn.Module:
    score_fn, options, ignore = _check_arguments(model, ratio, flops_reduction, scorer, scorer_options, ignore,
                                                 config, latency_reduction)
    config = _config(config, round_to)
    examples = list(as_examples(model, example_inputs))
    graph = trace(model, examples)
    check_coverage(graph, ignore)
    groups = find_groups(graph, ignore=ignore, model=model)
    scores = score_fn(groups, model, **options)
    if ratio is not None:
        plan = make_plan(groups, scores, ratio=ratio, config=config)
        applied, dropped = apply_verified_(model, groups, plan, examples)
        _warn_dropped(groups, dropped)
    elif latency_reduction is not None:  # modelled, then measured end to end on trial copies
        applied, latency_record = plan_for_latency(model, groups, scores, examples, latency_reduction, config,
                                                   latency_config)
        apply_plan_(model, applied)
        model.graphprune_latency = latency_record.to_dict()  # predicted vs measured
    else:  # verified and measured on a trial copy
        applied = plan_for_flops(model, groups, scores, examples, flops_reduction, config)
        apply_plan_(model, applied)
    record_plan(model, applied)
    return model


def _warn_dropped(groups: Groups, dropped: Mapping[int, str]) -> None:
    """Say which groups the verification left whole, and why (the pruned model failed without them)."""
    if dropped:
        lines = [f"group {gid} ({groups.by_id(gid).name}): {error}" for gid, error in dropped.items()]
        warnings.warn(f"{len(dropped)} groups left unpruned, since removing them breaks the model: " + "; ".join(lines),
                      stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside graphprune: warnings point at the user's call."""
    package, level, frame = os.path.dirname(__file__), 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def _config(config: PlanConfig | None, round_to: int | None) -> PlanConfig:
    config = config or PlanConfig()
    if round_to is not None:
        config = dataclasses.replace(config, round_to=round_to)
    return config


def _check_arguments(model: Any, ratio: float | None, flops_reduction: float | None, scorer: Any,
                     scorer_options: Any, ignore: Any, config: Any,
                     latency_reduction: float | None = None) -> tuple[Scorer, dict[str, Any], tuple[str, ...]]:
    """Every argument checked before anything runs: the scorer, its options and the ignore names, normalized."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.60}")
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise InvalidArgumentError(
            f"the model's tensors are on the meta device (e.g. {meta}): they hold no values to score or keep. "
            "Load the weights first (model.to_empty(device='cpu') and load_state_dict), or plan on it with the verbs "
            "(gp.trace, gp.find_groups, gp.make_plan(groups, removed=...)) and apply the plan to the real model")
    check_target(ratio, flops_reduction, latency_reduction)
    if config is not None and not isinstance(config, PlanConfig):
        raise InvalidArgumentError(f"config must be a graphprune.PlanConfig, e.g. PlanConfig(scope='global'), "
                                   f"got {type(config).__name__} {config!r:.60}")
    score_fn = get_scorer(scorer)
    return score_fn, _scorer_options(scorer, score_fn, scorer_options), check_ignore(model, ignore)


def _scorer_options(scorer: Any, score_fn: Scorer, options: Any) -> dict[str, Any]:
    """``options`` as a dict, once the scorer's signature accepts every key (when it can be read)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidArgumentError(f"scorer_options must be a dict of keyword arguments, got {type(options).__name__}")
    try:
        parameters = list(inspect.signature(score_fn).parameters.values())[2:]  # after (groups, model)
    except (TypeError, ValueError):  # a callable whose signature cannot be read: its call is the check
        return dict(options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(options)
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        name = scorer if isinstance(scorer, str) else getattr(scorer, "__name__", type(scorer).__name__)
        raise InvalidArgumentError(f"scorer {name!r} has no option {unknown[0]!r}; its options: {accepted or 'none'}")
    return dict(options)


def prune(model: nn.Module, example_inputs: ExampleInputs = None, *, ratio: float | None = None,
          flops_reduction: float | None = None, scorer: str | Scorer = "l1",
          scorer_options: Mapping[str, Any] | None = None, ignore: Iterable[str] = (),
          config: PlanConfig | None = None, round_to: int | None = None, latency_reduction: float | None = None,
          latency_config: LatencyConfig | None = None) -> nn.Module:
    """Return a structurally pruned copy of ``model``; the input model is not modified.

    Args:
        model: any ``nn.Module`` (timm models get a default example input).
        example_inputs: a tensor or tuple of positional arguments for tracing, or a list of
            those: each is traced (the graph is the union of the paths they take) and the
            pruned model verified on each; ``None`` uses one image of ``pretrained_cfg["input_size"]``.
        ratio: fraction of each group's channels to remove, in ``[0, 1)``; each group loses the
            whole count nearest ``ratio * size`` (:func:`graphprune.selection.removal_count`).
        flops_reduction: instead of ``ratio``: the fraction of MACs to remove, in ``(0, 1)``;
            the ratio is searched on the graph's MAC estimate and the result is verified
            with fvcore to within one percentage point.
        scorer: a registered scorer name (``"l1"``, ``"l2"``, ``"random"``, ``"bn_scale"``,
            ``"taylor"``, ``"target_taylor"``, ``"classmean"``) or a callable.
        scorer_options: keyword arguments for the scorer, e.g. ``{"data": loader}`` for the
            data-driven ones.
        ignore: module names whose parameters keep every channel (and what couples to them);
            naming a module the example inputs never reach declares it unused: it is left as is.
        config: selection options (local or global ranking, normalization, rounding,
            per-group cap); see :class:`graphprune.PlanConfig`.
        round_to: shortcut for ``config.round_to``: keep a multiple of this many channels.
        latency_reduction: instead of ``ratio``: the fraction of the measured median latency to
            remove, in ``(0, 1)``; widths are chosen on a per-layer latency table of this device
            and the pruned model is measured until it lands within ``latency_config.tolerance``
            (2 points); ``pruned.graphprune_latency`` holds predicted vs measured
            (:class:`graphprune.latency.LatencyRecord`). See :func:`graphprune.latency.plan_for_latency`.
        latency_config: batch size, threads, cache file and tolerance for ``latency_reduction``.

    Returns:
        The pruned copy: it has physically fewer channels, heads and FLOPs.

    Raises:
        InvalidArgumentError: not a module, a meta-device model, bad ratio, unknown scorer or
            scorer option, a ``config`` that is no ``PlanConfig``, ``ignore`` naming nothing.
        UnsupportedModelError: the model does not run on the example inputs.
        UntracedCodeError: the example inputs never reached some parameters (a branch that
            did not run) and ``ignore`` does not name them.
        PruneError: the pruned model would not run.

    Example:
        >>> import timm, torch, graphprune as gp
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> small = gp.prune(model, torch.randn(1, 3, 64, 64), ratio=0.5)
        >>> small(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in small.parameters()) < 0.35 * sum(p.numel() for p in model.parameters())
        True
        >>> gp.prune(model, torch.randn(1, 3, 64, 64), ratio=0.5, scorer_options={"seed": 1})
        Traceback (most recent call last):
        ...
        graphprune.errors.InvalidArgumentError: scorer 'l1' has no option 'seed'; its options: none
    """
    _check_arguments(model, ratio, flops_reduction, scorer, scorer_options, ignore, config, latency_reduction)
    pruned = copy.deepcopy(model)
    return prune_(pruned, example_inputs, ratio=ratio, flops_reduction=flops_reduction, scorer=scorer,
                  scorer_options=scorer_options, ignore=ignore, config=config, round_to=round_to,
                  latency_reduction=latency_reduction, latency_config=latency_config)
