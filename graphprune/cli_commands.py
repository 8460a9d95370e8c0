"""The bodies of ``graphprune prune``, ``measure`` and ``inspect``: parsed arguments in, a result dict out.

Each ``run_*`` returns the JSON document ``--json`` prints, with its text form under ``"_text"``;
:mod:`graphprune.cli` parses the arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli_model import LoadedModel, check_runs, example_inputs, load_model
from .errors import InvalidArgumentError
from .selection import PlanConfig

PROG = "graphprune"


@dataclass
class Progress:
    """Stage lines on stderr, ``graphprune: tracing ... [1.2 s]`` (the time since the command started).

    Attributes:
        enabled: print them; off, calls do nothing.
        started: ``time.perf_counter()`` when the command started.

    Example:
        >>> Progress(enabled=False)("tracing")  # prints nothing
    """

    enabled: bool
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, stage: str) -> None:
        if not self.enabled:
            return
        try:
            print(f"{PROG}: {stage} ... [{time.perf_counter() - self.started:.1f} s]", file=sys.stderr, flush=True)
        except OSError:  # a closed stderr is no reason to stop the work
            self.enabled = False


def progress_of(args: argparse.Namespace) -> Progress:
    """The command's stage reporter (``main`` sets it), or a silent one."""
    return getattr(args, "report", None) or Progress(enabled=False)


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    """MODEL with the weights the options name, after a stage line."""
    how = " (pretrained)" if args.pretrained else f" with {args.checkpoint}" if args.checkpoint else ""
    progress_of(args)(f"loading {args.model}{how}")
    return load_model(args.model, num_classes=args.num_classes, model_kwargs=args.model_kwargs,
                      pretrained=args.pretrained, checkpoint=args.checkpoint)


def measure_cli(model: nn.Module, inputs: torch.Tensor, *, latency: bool):
    """:func:`graphprune.measure` with the command's timing settings (3 warm-up runs, 10 timed)."""
    from .measurement import measure

    return measure(model, inputs, latency=latency, warmup=3, repeats=10)


def prune_target(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning target the command line asks for: ``ratio`` or ``flops_reduction``, and the scope."""
    target: dict[str, Any] = {"config": PlanConfig(scope=args.scope, round_to=args.round_to,
                                                   residual_scale=args.residual_scale)}
    if args.flops_reduction is not None:
        target["flops_reduction"] = args.flops_reduction
    elif getattr(args, "latency_reduction", None) is not None:
        target["latency_reduction"] = args.latency_reduction
    else:
        target["ratio"] = args.ratio
    return target


def check_output(output: Path, *, force: bool) -> None:
    """Before the slow part: OUTPUT is new or empty, or (with ``--force``) an earlier save."""
    from . import io

    io.check_target(output)  # the parent exists; OUTPUT is not a file or foreign directory
    if output.is_dir() and any(output.iterdir()) and not force:
        raise InvalidArgumentError(f"{output} already holds a saved model; pass --force to replace it, "
                                   "or choose a new OUTPUT")
    try:  # save stages its files in a folder beside OUTPUT: make one now, not after the prune
        probe = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".probe", dir=output.parent))
    except OSError as error:
        raise InvalidArgumentError(f"cannot write to {output.parent} ({error.strerror or error}); choose an "
                                   "OUTPUT in a writable folder") from None
    probe.rmdir()


def prune_in_stages(model: nn.Module, inputs: torch.Tensor, args: argparse.Namespace,
                    report: Progress) -> nn.Module:
    """:func:`graphprune.prune_` spelled out as its verbs, with a stage line before each.

    Args:
        model: pruned in place.
        inputs: the example input.
        args: ``ratio`` / ``flops_reduction``, ``scope``, ``round_to``, ``scorer``, ``ignore``.
        report: where the stage lines go.

    Returns:
        ``model``, pruned, with the plan recorded for :func:`graphprune.save`.

    Example:
        >>> import timm
        >>> from graphprune.cli import build_parser
        >>> args = build_parser().parse_args(["prune", "test_resnet", "-o", "x", "--ratio", "0.5"])
        >>> model = prune_in_stages(timm.create_model("test_resnet"), torch.randn(1, 3, 32, 32), args,
        ...                         Progress(enabled=False))
        >>> model.fc.in_features
        48
    """
    from ._runtime import paused_gc
    from .budget import check_target, plan_for_flops
    from .groups import check_ignore, find_groups
    from .history import record_plan
    from .plan import make_plan
    from .removal import apply_plan_
    from .scoring import get_scorer
    from .tracer import trace
    from .verify import apply_verified_, check_coverage

    target = prune_target(args)
    check_target(target.get("ratio"), target.get("flops_reduction"), target.get("latency_reduction"))
    scorer = get_scorer(args.scorer)
    ignore = check_ignore(model, args.ignore or ())
    with paused_gc():
        report(f"tracing on an input of shape {tuple(inputs.shape)}")
        graph = trace(model, (inputs,))
        check_coverage(graph, ignore)
        groups = find_groups(graph, ignore=ignore, model=model)
        report(f"scoring {len(groups.all)} channel groups ({args.scorer})")
        scores = scorer(groups, model)
        if target.get("latency_reduction") is not None:
            from .latency import plan_for_latency

            report(f"planning for {args.latency_reduction:.0%} lower latency: timing layers, then measuring copies")
            applied, record = plan_for_latency(model, groups, scores, [(inputs,)], args.latency_reduction,
                                               target["config"])
            report(f"predicted {record.predicted:.1%}, measured {record.measured:.1%} in {len(record.steps)} tries")
            apply_plan_(model, applied)
            model.graphprune_latency = record.to_dict()
        elif args.flops_reduction is None:
            report(f"planning: {args.ratio:g} of each group's channels ({args.scope})")
            plan = make_plan(groups, scores, ratio=args.ratio, config=target["config"])
            report("removing and verifying that the pruned model runs")
            applied, _ = apply_verified_(model, groups, plan, (inputs,))
        else:
            report(f"planning for {args.flops_reduction:.0%} fewer MACs, verified and measured on a copy")
            applied = plan_for_flops(model, groups, scores, (inputs,), args.flops_reduction, target["config"])
            report("removing")
            apply_plan_(model, applied)
    record_plan(model, applied)
    return model


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    """``graphprune prune``: load, measure, prune in stages, measure, save; the before/after table."""
    from . import io
    from .history import plan_texts
    from .measurement import compare

    report = progress_of(args)
    output = Path(args.output)
    check_output(output, force=args.force)
    loaded = load_from_args(args)
    inputs = example_inputs(loaded, args.input_size)
    check_runs(loaded, inputs)
    report(f"measuring {args.model}")
    before = measure_cli(loaded.model, inputs, latency=args.latency)
    pruned = prune_in_stages(loaded.model, inputs, args, report)
    report("measuring the pruned model")
    after = measure_cli(pruned, inputs, latency=args.latency)
    architecture = dict(loaded.architecture)
    architecture.setdefault("input_size", list(inputs.shape[1:]))
    report(f"saving to {output}")
    io.save(pruned, output, architecture=architecture)
    table = compare(before, after)
    return {"model": loaded.source, "output": str(output), "ratio": args.ratio,
            "flops_reduction": args.flops_reduction, "latency_reduction": args.latency_reduction,
            "latency_target": getattr(pruned, "graphprune_latency", None), "scope": args.scope, "scorer": args.scorer,
            "input_size": list(inputs.shape[1:]), "plans": len(plan_texts(pruned)),
            "comparison": table.to_dict(), "_text": f"{table}\nsaved to {output}"}


def run_measure(args: argparse.Namespace) -> dict[str, Any]:
    """``graphprune measure``: parameters, MACs and CPU latency of MODEL."""
    loaded = load_from_args(args)
    inputs = example_inputs(loaded, args.input_size)
    check_runs(loaded, inputs)
    progress_of(args)(f"measuring {args.model}")
    result = measure_cli(loaded.model, inputs, latency=args.latency)
    values = result.to_dict()
    values.pop("macs_by_module")
    lines = [f"model       {loaded.source}", f"input       {tuple(inputs.shape)}",
             f"params      {result.params:,}", f"MACs        {result.macs:,}"]
    if result.latency_ms_median is not None:
        lines.append(f"latency     {result.latency_ms_median:.2f} ms [p10 {result.latency_ms_p10:.2f}, "
                     f"p90 {result.latency_ms_p90:.2f}], batch {result.batch_size}, {result.threads} thread(s)")
    if result.uncounted_ops:
        lines.append(f"uncounted   {dict(result.uncounted_ops)}")
    return {"model": loaded.source, "input_size": list(inputs.shape[1:]), **values, "_text": "\n".join(lines)}


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """``graphprune inspect``: MODEL's channel groups and what is frozen, and why."""
    from .groups import find_groups
    from .tracer import trace

    loaded = load_from_args(args)
    inputs = example_inputs(loaded, args.input_size)
    progress_of(args)(f"tracing on an input of shape {tuple(inputs.shape)}")
    groups = find_groups(trace(loaded.model, inputs), ignore=args.ignore or (), model=loaded.model)
    listed = [{"id": g.id, "name": g.name, "channels": g.size, "prunable": int(g.prunable.sum()),
               "members": [{"name": m.name, "dim": m.dim, "role": m.role} for m in g.members]} for g in groups.all]
    return {"model": loaded.source, "input_size": list(inputs.shape[1:]), "groups": listed,
            "frozen": dict(groups.frozen_reasons), "unsupported_ops": dict(groups.graph.unsupported),
            "_text": groups.report()}
