"""The ``graphprune`` command: prune, measure and inspect timm models from the shell.

Every subcommand takes a MODEL that is either a directory written by ``graphprune.save``
(or ``graphprune prune``) or a timm model name (built with ``pretrained=False``; timm
weights are never downloaded). ``--json`` prints one JSON document on stdout instead of
text; errors are one line on stderr, ``graphprune: error: ...``, with exit status 2 for
bad input and 1 for anything unexpected (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GraphpruneError, InvalidArgumentError
from .plan import PlanConfig
from .scoring import SCORERS

PROG = "graphprune"
EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2

_EPILOG = """\
examples:
  graphprune prune resnet18 -o resnet18-30 --ratio 0.3 --num-classes 10 --input-size 3,224,224
  graphprune prune vit_small_patch16_224 -o vit-half --ratio 0.5 --model-kwargs '{"img_size": 64}'
  graphprune prune resnet18-30 -o resnet18-50 --ratio 0.3     # prune a saved model again
  graphprune prune resnet50 -o resnet50-f30 --flops-reduction 0.3 --no-latency
  graphprune measure resnet18-30 --no-latency --json
  graphprune inspect efficientnet_b0 --input-size 3,64,64

MODEL is a directory written by graphprune (model.safetensors + graphprune.json) or a timm
model name, created with pretrained=False. Exit status: 0 ok, 2 bad input, 1 unexpected error.
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


def load_model(source: str, *, num_classes: int | None = None,
               model_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """A saved graphprune directory, or a timm model created with ``pretrained=False``.

    Args:
        source: a path to a saved model or a timm model name.
        num_classes: classifier size for a timm name (a saved model keeps its own).
        model_kwargs: more ``timm.create_model`` keyword arguments for a timm name.

    Raises:
        InvalidArgumentError: an unknown model name, or options that do not apply.
        graphprune.io.ModelFileError: a saved model that cannot be read.

    Example:
        >>> load_model("resnet18", num_classes=3).model.fc.out_features
        3
    """
    from . import io

    path = Path(source)
    if path.exists():
        if num_classes is not None or model_kwargs:
            raise InvalidArgumentError(f"--num-classes/--model-kwargs apply to timm model names, not to the saved "
                                       f"model {source}")
        model = io.load(path)
        return LoadedModel(model, source, getattr(model, io.ARCHITECTURE_ATTR))
    import timm

    if not timm.is_model(source):
        import difflib

        close = difflib.get_close_matches(source, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise io.ModelFileNotFoundError(f"{source!r} is neither a saved model (no such file or directory) "
                                        f"nor a timm model name{hint}")
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        if num_classes < 0:
            raise InvalidArgumentError(f"--num-classes must be >= 0, got {num_classes}")
        kwargs["num_classes"] = num_classes
    architecture = io.Architecture.from_dict({"timm": source, "kwargs": kwargs})
    model = io.build_model(architecture).eval()
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


def _measure(model: nn.Module, inputs: torch.Tensor, *, latency: bool):
    from .measurement import measure

    return measure(model, inputs, latency=latency, warmup=3, repeats=10)


def _prune_target(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning target the command line asks for: ``ratio`` or ``flops_reduction``, and the scope."""
    target: dict[str, Any] = {"config": PlanConfig(scope=args.scope, round_to=args.round_to)}
    if args.flops_reduction is not None:
        target["flops_reduction"] = args.flops_reduction
    else:
        target["ratio"] = args.ratio
    return target


def _cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from . import api, io
    from .measurement import compare

    output = Path(args.output)
    io.check_target(output)  # before the slow part
    loaded = load_model(args.model, num_classes=args.num_classes, model_kwargs=args.model_kwargs)
    inputs = example_inputs(loaded, args.input_size)
    check_runs(loaded, inputs)
    before = _measure(loaded.model, inputs, latency=args.latency)
    target = _prune_target(args)
    pruned = api.prune(loaded.model, inputs, scorer=args.scorer, ignore=args.ignore or (), **target)
    after = _measure(pruned, inputs, latency=args.latency)
    architecture = dict(loaded.architecture)
    architecture.setdefault("input_size", list(inputs.shape[1:]))
    io.save(pruned, output, architecture=architecture)
    table = compare(before, after)
    return {"model": loaded.source, "output": str(output), "ratio": args.ratio,
            "flops_reduction": args.flops_reduction, "scope": args.scope, "scorer": args.scorer,
            "input_size": list(inputs.shape[1:]), "plans": len(getattr(pruned, api.HISTORY_ATTR, [])),
            "comparison": table.to_dict(), "_text": f"{table}\nsaved to {output}"}


def _cmd_measure(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.model, num_classes=args.num_classes, model_kwargs=args.model_kwargs)
    inputs = example_inputs(loaded, args.input_size)
    check_runs(loaded, inputs)
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

    loaded = load_model(args.model, num_classes=args.num_classes, model_kwargs=args.model_kwargs)
    inputs = example_inputs(loaded, args.input_size)
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
    return common


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a saved graphprune directory or a timm model name")
    parser.add_argument("--input-size", type=_parse_input_size, metavar="C,H,W",
                        help="example input (batch 1); default: the saved size or timm's pretrained_cfg")
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier size when MODEL is a timm name")
    parser.add_argument("--model-kwargs", type=_parse_kwargs, metavar="JSON",
                        help='more timm.create_model arguments, e.g. \'{"img_size": 64}\'')


def _add_prune(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "prune", parents=[common], help="prune a model and save it", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prune MODEL, save it to OUTPUT (a directory) and print the before/after table.")
    _add_model_options(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="directory to write")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, in [0, 1)")
    target.add_argument("--flops-reduction", type=float, metavar="F",
                        help="fraction of MACs to remove, in (0, 1); verified with fvcore to within 1 point")
    parser.add_argument("--scope", choices=("local", "global"), default="local",
                        help="local: same fraction of every group; global: one ranking over all groups")
    parser.add_argument("--round-to", type=int, default=1, metavar="N",
                        help="keep a multiple of N channels per group (default 1)")
    parser.add_argument("--scorer", default="l1", help=f"channel importance, one of {', '.join(sorted(SCORERS))}; "
                                                       "default l1")
    parser.add_argument("--ignore", action="append", metavar="NAME",
                        help="a module whose channels stay, with all coupled to them (repeat for more)")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip CPU timing")
    parser.set_defaults(run=_cmd_prune)


def _add_measure(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "measure", parents=[common], help="print parameters, MACs and CPU latency", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure MODEL: parameters, MACs (one fused multiply-add = one MAC), CPU latency.")
    _add_model_options(parser)
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip CPU timing")
    parser.set_defaults(run=_cmd_measure)


def _add_inspect(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "inspect", parents=[common], help="list channel groups and what is frozen", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trace MODEL and list its channel groups, their sizes, and what is frozen and why.")
    _add_model_options(parser)
    parser.add_argument("--ignore", action="append", metavar="NAME", help="a module to freeze (repeat for more)")
    parser.set_defaults(run=_cmd_inspect)


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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_prune(subparsers, common)
    _add_measure(subparsers, common)
    _add_inspect(subparsers, common)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 unexpected).

    Example:
        >>> main(["measure", "resnet18", "--input-size", "3,32,32", "--no-latency", "--json"])  # doctest: +ELLIPSIS
        {...}
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as done:  # --help
                return int(done.code or 0)
            result = args.run(args)
        text = result.pop("_text")
        print(json.dumps(result, indent=2, allow_nan=False) if args.json else text)
        return EXIT_OK
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
