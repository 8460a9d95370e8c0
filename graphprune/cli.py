"""The ``graphprune`` command: prune, measure and inspect timm models from the shell.

Every subcommand takes a MODEL that is either a directory written by ``graphprune.save``
(or ``graphprune prune``) or a timm model name, with random weights unless ``--pretrained``
(timm's own loading: hub, ``hf-hub:``, ``local-dir:``) or ``--checkpoint PATH`` (a local
safetensors file or torch state dict) gives weights; see :mod:`graphprune.sources`.
``--json`` prints one JSON document on stdout instead of text; errors are one line on
stderr, ``graphprune: error: ...``, with exit status 2 for bad input and 1 for anything
unexpected (``--debug`` adds the traceback). Long work reports its stages on stderr
(``graphprune: tracing ...``) when stderr is a terminal, or always with ``--progress``;
``--quiet`` silences them. A reader that stops early (``| head``) ends the command quietly,
with status 141 like other Unix tools.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GraphpruneError, InvalidArgumentError
from .selection import PlanConfig
from .scoring import list_scorers
from .sources import RandomWeightsWarning

PROG = "graphprune"
EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what `yes | head` reports for `yes`
# create_model arguments that only say where weights come from (with --pretrained); never recorded in a save
_FETCH_KWARGS = frozenset({"pretrained_cfg_overlay", "cache_dir"})
_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")

_EPILOG = """\
examples:
  graphprune prune resnet18 -o resnet18-30 --ratio 0.3 --num-classes 10 --input-size 3,224,224
  graphprune prune resnet18.a1_in1k --pretrained -o r18-30 --ratio 0.3   # timm's weights (hub or cache)
  graphprune prune resnet18 --checkpoint weights.safetensors -o r18-30 --ratio 0.3
  graphprune prune vit_small_patch16_224 -o vit-half --ratio 0.5 --model-kwargs '{"img_size": 64}'
  graphprune prune resnet18-30 -o resnet18-50 --ratio 0.3     # prune a saved model again
  graphprune prune resnet50 -o resnet50-f30 --flops-reduction 0.3 --no-latency
  graphprune measure resnet18-30 --no-latency --json
  graphprune inspect efficientnet_b0 --input-size 3,64,64

MODEL is a directory written by graphprune (model.safetensors + graphprune.json) or a timm
model name (random weights unless --pretrained or --checkpoint). Exit status: 0 ok, 2 bad
input, 1 unexpected error, 141 output pipe closed early.
"""


class _UsageError(InvalidArgumentError):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise _UsageError(f"{message} (see {self.prog} --help)")


@dataclass(frozen=True)
class LoadedModel:
    """A model from the command line.

    Attributes:
        model: the module, in eval mode.
        source: what MODEL named (a directory or a timm name).
        architecture: the rebuild recipe ``save`` records (``{"timm", "kwargs", "input_size"}``).
    """

    model: nn.Module
    source: str
    architecture: dict[str, Any]


def _parse_input_size(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,224,224) or one size S, got {text!r}") from None
    if len(size) not in (1, 3) or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,224,224) or one size S, got {text!r}")
    return size


def _parse_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def load_model(source: str, *, num_classes: int | None = None, model_kwargs: dict[str, Any] | None = None,
               pretrained: bool = False, checkpoint: str | os.PathLike | None = None) -> LoadedModel:
    """A saved graphprune directory, or a timm model, with weights from ``pretrained`` or ``checkpoint``.

    Args:
        source: a path to a saved model, a timm model name (``resnet18``, ``resnet18.a1_in1k``)
            or a timm source (``hf-hub:...``, ``local-dir:...``).
        num_classes: classifier size for a timm name (a saved model keeps its own).
        model_kwargs: more ``timm.create_model`` keyword arguments for a timm name;
            ``pretrained_cfg_overlay`` / ``cache_dir`` only with ``pretrained``.
        pretrained: timm's pretrained weights (:func:`graphprune.sources.create_model`).
        checkpoint: a local safetensors file or torch state dict to load instead.

    Raises:
        InvalidArgumentError: an unknown model name, or options that do not apply.
        graphprune.io.ModelFileError: a saved model that cannot be read.
        graphprune.sources.PretrainedWeightsError: pretrained weights that cannot be fetched.

    Example:
        >>> load_model("resnet18", num_classes=3).model.fc.out_features
        3
    """
    from . import io, sources

    path = Path(source)
    if not source.startswith(_SOURCE_PREFIXES) and path.exists():
        if num_classes is not None or model_kwargs or pretrained or checkpoint is not None:
            raise InvalidArgumentError(f"--num-classes/--model-kwargs/--pretrained/--checkpoint apply to timm model "
                                       f"names, not to the saved model {source}")
        model = io.load(path)
        return LoadedModel(model, source, getattr(model, io.ARCHITECTURE_ATTR))
    import timm

    if not source.startswith(_SOURCE_PREFIXES) and not timm.is_model(source):
        import difflib

        close = difflib.get_close_matches(source, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise io.ModelFileNotFoundError(f"{source!r} is neither a saved model (no such file or directory) "
                                        f"nor a timm model name{hint}")
    kwargs = dict(model_kwargs or {})
    for key, option in (("pretrained", "--pretrained"), ("checkpoint_path", "--checkpoint PATH")):
        if key in kwargs:
            raise InvalidArgumentError(f"--model-kwargs may not set {key}; use {option}")
    fetch = {k: kwargs.pop(k) for k in sorted(_FETCH_KWARGS & set(kwargs))}
    if fetch and not pretrained:
        raise InvalidArgumentError(f"--model-kwargs {sorted(fetch)} say where pretrained weights come from; "
                                   "they need --pretrained")
    if num_classes is not None:
        if num_classes < 0:
            raise InvalidArgumentError(f"--num-classes must be >= 0, got {num_classes}")
        kwargs["num_classes"] = num_classes
    architecture = io.Architecture.from_dict({"timm": source, "kwargs": kwargs})  # JSON values, no file arguments
    model = sources.create_model(source, pretrained=pretrained, checkpoint=checkpoint, **kwargs, **fetch).eval()
    recipe = io.infer_architecture(model).to_dict()
    recipe["kwargs"] = {**recipe["kwargs"], **architecture.kwargs}
    return LoadedModel(model, source, recipe)


def example_inputs(loaded: LoadedModel, input_size: tuple[int, ...] | None) -> torch.Tensor:
    """One seeded random image: ``--input-size``, else the saved ``input_size``, else timm's default.

    Example:
        >>> example_inputs(load_model("resnet18"), (3, 32, 32)).shape
        torch.Size([1, 3, 32, 32])
    """
    from .inputs import default_input_size

    if input_size is None:
        input_size = tuple(loaded.architecture.get("input_size") or default_input_size(loaded.model))
    elif len(input_size) == 1:
        channels = (loaded.architecture.get("input_size") or default_input_size(loaded.model))[0]
        input_size = (channels, input_size[0], input_size[0])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *input_size, generator=generator)


def check_runs(loaded: LoadedModel, inputs: torch.Tensor) -> None:
    """Run the model once; a failure is bad input (a wrong ``--input-size``), not a crash.

    Raises:
        InvalidArgumentError: the forward pass fails, with the model's own message.

    Example:
        >>> check_runs(load_model("resnet18"), torch.randn(1, 3, 32, 32))
    """
    try:
        with torch.no_grad():
            loaded.model(inputs)
    except Exception as error:  # the model's own failure is the message
        raise InvalidArgumentError(f"{loaded.source} does not run on an input of shape {tuple(inputs.shape)} "
                                   f"(set --input-size): {type(error).__name__}: {error}") from error


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


def _progress(args: argparse.Namespace) -> Progress:
    return getattr(args, "report", None) or Progress(enabled=False)


def _load(args: argparse.Namespace) -> LoadedModel:
    how = " (pretrained)" if args.pretrained else f" with {args.checkpoint}" if args.checkpoint else ""
    _progress(args)(f"loading {args.model}{how}")
    return load_model(args.model, num_classes=args.num_classes, model_kwargs=args.model_kwargs,
                      pretrained=args.pretrained, checkpoint=args.checkpoint)


def _measure(model: nn.Module, inputs: torch.Tensor, *, latency: bool):
    from .measurement import measure

    return measure(model, inputs, latency=latency, warmup=3, repeats=10)


def _prune_target(args: argparse.Namespace) -> dict[str, Any]:
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


def _check_output(output: Path, *, force: bool) -> None:
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

    target = _prune_target(args)
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


def _cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from . import io
    from .history import plan_texts
    from .measurement import compare

    report = _progress(args)
    output = Path(args.output)
    _check_output(output, force=args.force)
    loaded = _load(args)
    inputs = example_inputs(loaded, args.input_size)
    check_runs(loaded, inputs)
    report(f"measuring {args.model}")
    before = _measure(loaded.model, inputs, latency=args.latency)
    pruned = prune_in_stages(loaded.model, inputs, args, report)
    report("measuring the pruned model")
    after = _measure(pruned, inputs, latency=args.latency)
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


def _cmd_measure(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _load(args)
    inputs = example_inputs(loaded, args.input_size)
    check_runs(loaded, inputs)
    _progress(args)(f"measuring {args.model}")
    result = _measure(loaded.model, inputs, latency=args.latency)
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


def _cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from .groups import find_groups
    from .tracer import trace

    loaded = _load(args)
    inputs = example_inputs(loaded, args.input_size)
    _progress(args)(f"tracing on an input of shape {tuple(inputs.shape)}")
    groups = find_groups(trace(loaded.model, inputs), ignore=args.ignore or (), model=loaded.model)
    listed = [{"id": g.id, "name": g.name, "channels": g.size, "prunable": int(g.prunable.sum()),
               "members": [{"name": m.name, "dim": m.dim, "role": m.role} for m in g.members]} for g in groups.all]
    return {"model": loaded.source, "input_size": list(inputs.shape[1:]), "groups": listed,
            "frozen": dict(groups.frozen_reasons), "unsupported_ops": dict(groups.graph.unsupported),
            "_text": groups.report()}


def _common() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    common.add_argument("--debug", action="store_true", help="show tracebacks and warnings")
    common.add_argument("--progress", action="store_true",
                        help="print stage lines on stderr even when it is not a terminal")
    common.add_argument("-q", "--quiet", action="store_true", help="no stage lines and no warnings")
    return common


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a saved graphprune directory or a timm model name")
    parser.add_argument("--input-size", type=_parse_input_size, metavar="C,H,W",
                        help="example input (batch 1); default: the saved size or timm's pretrained_cfg")
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier size when MODEL is a timm name")
    parser.add_argument("--model-kwargs", type=_parse_kwargs, metavar="JSON",
                        help='more timm.create_model arguments, e.g. \'{"img_size": 64}\'')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="timm's pretrained weights for a timm name, loaded the timm way (hub or cache, "
                              "hf-hub:, local-dir:, --model-kwargs '{\"pretrained_cfg_overlay\": {\"file\": ...}}')")
    weights.add_argument("--checkpoint", metavar="PATH",
                         help="weights for a timm name from a local .safetensors file or torch state dict "
                              "(read with weights_only=True); keys must match")


def _model_command(subparsers, common: argparse.ArgumentParser, name: str, summary: str,
                   description: str) -> argparse.ArgumentParser:
    """A subcommand that takes MODEL and the model options."""
    parser = subparsers.add_parser(name, parents=[common], help=summary, epilog=_EPILOG, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(parser)
    return parser


def _add_prune(subparsers, common: argparse.ArgumentParser) -> None:
    parser = _model_command(subparsers, common, "prune", "prune a model and save it",
                            "Prune MODEL, save it to OUTPUT (a directory) and print the before/after table.")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="directory to write (new or empty, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an earlier save at OUTPUT")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, in [0, 1)")
    target.add_argument("--flops-reduction", type=float, metavar="F",
                        help="fraction of MACs to remove, in (0, 1); verified with fvcore to within 1 point")
    target.add_argument("--latency-reduction", type=float, metavar="L",
                        help="fraction of the measured CPU latency to remove, in (0, 1); measured to within 2 points")
    parser.add_argument("--scope", choices=("local", "global"), default="local",
                        help="local: same fraction of every group; global: one ranking over all groups")
    parser.add_argument("--round-to", type=int, default=1, metavar="N",
                        help="keep a multiple of N channels per group (default 1)")
    parser.add_argument("--residual-scale", type=float, default=1.0, metavar="S",
                        help="prune residual streams at S times the others' ratio (0: keep them whole; default 1)")
    parser.add_argument("--scorer", default="l1", help=f"channel importance, one of {', '.join(list_scorers())}; "
                                                       "default l1")
    parser.add_argument("--ignore", action="append", metavar="NAME",
                        help="a module whose channels stay, with all coupled to them (repeat for more)")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip CPU timing")
    parser.set_defaults(run=_cmd_prune)


def _add_measure(subparsers, common: argparse.ArgumentParser) -> None:
    parser = _model_command(subparsers, common, "measure", "print parameters, MACs and CPU latency",
                            "Measure MODEL: parameters, MACs (one fused multiply-add = one MAC), CPU latency.")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip CPU timing")
    parser.set_defaults(run=_cmd_measure)


def _add_inspect(subparsers, common: argparse.ArgumentParser) -> None:
    parser = _model_command(subparsers, common, "inspect", "list channel groups and what is frozen",
                            "Trace MODEL and list its channel groups, their sizes, and what is frozen and why.")
    parser.add_argument("--ignore", action="append", metavar="NAME", help="a module to freeze (repeat for more)")
    parser.set_defaults(run=_cmd_inspect)


def add_transfer(subparsers, common: argparse.ArgumentParser) -> None:
    """Register ``graphprune transfer`` (defined with the recipes, imported only when the parser is built)."""
    from .recipes.command import add_transfer as add

    add(subparsers, common)


def build_parser() -> argparse.ArgumentParser:
    """The ``graphprune`` argument parser.

    Example:
        >>> build_parser().parse_args(["measure", "resnet18", "--no-latency"]).latency
        False
    """
    common = _common()
    parser = _Parser(prog=PROG, parents=[common], epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Structural pruning of timm / PyTorch models: remove channels and heads, "
                                 "save without pickle, measure the result.")
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_prune(subparsers, common)
    _add_measure(subparsers, common)
    _add_inspect(subparsers, common)
    add_transfer(subparsers, common)  # the transfer recipes (graphprune.recipes.command)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"{PROG} {__version__} (torch {torch.__version__}, timm {of('timm')})"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """graphprune's own warnings as one line, ``graphprune: warning: ...``; others as Python shows them."""
    if issubclass(category, RandomWeightsWarning):
        print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _write_result(text: str) -> int:
    """Print the result; a reader that went away (``| head``) ends the command quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # the interpreter flushes stdout again at exit; point it at /dev/null first
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_CLOSED_PIPE
    return EXIT_OK


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 unexpected).

    Example:
        >>> main(["measure", "resnet18", "--input-size", "3,32,32", "--no-latency", "--json"])  # doctest: +ELLIPSIS
        {...}
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet = "-q" in argv or "--quiet" in argv
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            if not quiet:
                warnings.simplefilter("always", RandomWeightsWarning)
            warnings.showwarning = _show_warning  # catch_warnings puts the original back
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as done:  # --help, --version
                return int(done.code or 0)
            args.report = Progress(enabled=not args.quiet and (args.progress or _is_terminal(sys.stderr)))
            result = args.run(args)
        text = result.pop("_text")
        return _write_result(json.dumps(result, indent=2, allow_nan=False) if args.json else text)
    except (GraphpruneError, ValueError, FileNotFoundError) as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last resort: one line, status 1
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"{PROG}: error: unexpected {type(error).__name__}: {_one_line(error)}{hint}", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
