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
import traceback
import warnings
from collections.abc import Sequence

import torch

from .cli_commands import PROG, Progress, run_inspect, run_measure, run_prune
from .cli_model import parse_input_size, parse_kwargs
from .errors import GraphpruneError, InvalidArgumentError
from .scoring import list_scorers
from .sources import RandomWeightsWarning

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what `yes | head` reports for `yes`

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
    parser.add_argument("--input-size", type=parse_input_size, metavar="C,H,W",
                        help="example input (batch 1); default: the saved size or timm's pretrained_cfg")
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier size when MODEL is a timm name")
    parser.add_argument("--model-kwargs", type=parse_kwargs, metavar="JSON",
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
    parser.set_defaults(run=run_prune)


def _add_measure(subparsers, common: argparse.ArgumentParser) -> None:
    parser = _model_command(subparsers, common, "measure", "print parameters, MACs and CPU latency",
                            "Measure MODEL: parameters, MACs (one fused multiply-add = one MAC), CPU latency.")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip CPU timing")
    parser.set_defaults(run=run_measure)


def _add_inspect(subparsers, common: argparse.ArgumentParser) -> None:
    parser = _model_command(subparsers, common, "inspect", "list channel groups and what is frozen",
                            "Trace MODEL and list its channel groups, their sizes, and what is frozen and why.")
    parser.add_argument("--ignore", action="append", metavar="NAME", help="a module to freeze (repeat for more)")
    parser.set_defaults(run=run_inspect)


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
