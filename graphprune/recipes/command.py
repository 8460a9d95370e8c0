"""``graphprune transfer``: run a transfer recipe on an ImageFolder root from the shell.

Progress bars (one per stage: probe, fine-tuning, scoring, pruning) go to stderr; ``-q``
turns them off. The subcommand builds a timm model (random init, ``--pretrained`` the timm way, or a local
``--checkpoint``), the data (:func:`~graphprune.recipes.image_folder_data`), one recipe config
from the flags, and runs the recipe with progress bars on stderr and stage checkpoints under
``OUT/checkpoints``. It writes::

    OUT/
        model/          # graphprune.io.save of the returned (pruned) model
        metrics.json    # RecipeResult (+ "test_accuracy" when ROOT/test exists, reporting only)
        metrics.csv     # one row per stage
        checkpoints/    # one saved model per finished stage: rerunning the same command resumes

``OUT`` that exists and is not this command's own unfinished run is refused unless
``--force`` (which starts over).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

RECIPES = ("s_to_t", "s_tp_t", "sp_t", "transtailor")
GRANULARITIES = ("channel", "kernel", "unstructured")  # recipes.prune_config.GRANULARITIES, without importing torch
CHECKPOINTS = "checkpoints"


def add_transfer(subparsers, common: argparse.ArgumentParser) -> None:
    """Register the ``transfer`` subcommand on the ``graphprune`` parser.

    Example:
        >>> from graphprune.cli import build_parser
        >>> args = build_parser().parse_args(["transfer", "resnet18", "--data", "d", "-o", "out"])
        >>> args.recipe, args.image_size, _configs(args).prune.flops_reduction  # the budget defaults to 0.3
        ('s_tp_t', 128, 0.3)
        >>> argv = ["transfer", "resnet18", "--data", "d", "-o", "out", "--recipe", "sp_t", "--granularity", "kernel"]
        >>> _configs(build_parser().parse_args(argv)).prune.granularity
        'kernel'
        >>> round(_configs(build_parser().parse_args(argv[:-2] + ["--prune-steps", "3"])).prune.step_reductions()[0], 3)
        0.1
    """
    from .config import FinetuneConfig, PruneConfig

    defaults = FinetuneConfig()
    parser = subparsers.add_parser(
        "transfer", parents=[common], help="fine-tune and prune a model on an ImageFolder dataset",
        description="Run a transfer recipe (S->T, S->TP->T, SP->T, TransTailor) on ROOT/train and ROOT/val "
                    "(ROOT/test, if present, is evaluated once at the end for the report only). Rerunning "
                    "the same command with the same -o resumes after the last finished stage.")
    parser.add_argument("model", metavar="MODEL", help="a timm model name")
    parser.add_argument("--data", required=True, metavar="ROOT", help="ImageFolder root with train/ and val/")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT (start over)")
    parser.add_argument("--recipe", choices=RECIPES, default="s_tp_t")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub, "
                         "or a timm hf-hub:/local-dir: name)")
    weights.add_argument("--checkpoint", metavar="PATH", help="local .safetensors or torch state dict")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--flops-reduction", type=float, default=None, metavar="F",
                        help="fraction of MACs to remove (default 0.3)")
    budget.add_argument("--ratio", type=float, default=None, metavar="R", help="fraction of channels to remove")
    budget.add_argument("--latency-reduction", type=float, default=None, metavar="L",
                        help="fraction of the batch-1 latency measured on this machine to remove (channels, one cut)")
    parser.add_argument("--scorer", default="l1", help="pruning scorer (default l1; kernel and unstructured: "
                        "l1 = weight magnitude, or random)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="channel",
                        help="what s_tp_t / sp_t prune: whole channels (default), K x K kernels (saved as "
                             "KernelConv2d layers) or single weights (saved as zeros); the fine ones need "
                             "--flops-reduction (of nonzero-weight MACs for unstructured)")
    parser.add_argument("--residual-scale", type=float, default=PruneConfig.residual_scale, metavar="S",
                        help="prune residual streams at S times the others' ratio (default "
                             f"{PruneConfig.residual_scale:g}: keep them whole; 1: like every other group)")
    parser.add_argument("--prune-steps", type=int, default=1, metavar="N",
                        help="reach --flops-reduction in N equal steps, each fine-tuned for 1/N of --target-epochs "
                             "(default 1: one cut)")
    parser.add_argument("--classifier-reuse", action="store_true", help="S->TP->T: keep the fine-tuned classifier")
    parser.add_argument("--alignment-weight", type=float, default=0.0, metavar="W",
                        help="class-mean alignment loss weight (default 0)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="fine-tuning epochs before pruning")
    parser.add_argument("--target-epochs", type=float, default=5.0, help="fine-tuning epochs after pruning")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak backbone learning rate")
    parser.add_argument("--optimizer", default=defaults.optimizer, help="a timm optimizer name")
    parser.add_argument("--head-init", choices=("probe", "random"), default="probe",
                        help="fit the new classifier as a linear probe first (default) or start random")
    parser.add_argument("--image-size", type=int, default=128, metavar="PX")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_transfer)


def _configs(args: argparse.Namespace):
    from . import config as C

    budget = {"ratio": args.ratio, "flops_reduction": args.flops_reduction, "latency_reduction": args.latency_reduction}
    out = Path(args.output)
    run = C.RunConfig(checkpoint_dir=str(out / CHECKPOINTS), seed=args.seed, progress=not args.quiet,
                      device=args.device, precision=args.precision)
    source = C.FinetuneConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer)
    target = C.FinetuneConfig(epochs=args.target_epochs, lr=args.lr, optimizer=args.optimizer)
    if args.recipe == "transtailor":
        if args.ratio is not None or args.latency_reduction is not None:
            raise InvalidArgumentError("--recipe transtailor searches its own FLOPs budget; --ratio and "
                                       "--latency-reduction do not apply")
        return C.TransTailorConfig(source=source, finetune=target, run=run, head_init=args.head_init)
    if args.granularity != "channel" and args.recipe not in ("s_tp_t", "sp_t"):
        raise InvalidArgumentError(f"--granularity {args.granularity} applies to --recipe s_tp_t or sp_t, "
                                   f"not {args.recipe}")
    prune = C.PruneConfig(scorer=args.scorer, classifier_reuse=args.classifier_reuse,
                          alignment_weight=args.alignment_weight, granularity=args.granularity,
                          residual_scale=args.residual_scale, steps=args.prune_steps, **budget)
    return C.TransferConfig(source=source, prune=prune, target=target, run=run, head_init=args.head_init)


def _prepare_output(out: Path, force: bool) -> None:
    """Refuse an existing OUT unless it is this command's own run (resume) or ``--force``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InvalidArgumentError(f"-o {out} exists and is not a directory")
    if force:
        shutil.rmtree(out)
        return
    entries = {p.name for p in out.iterdir()}
    if entries and not entries <= {CHECKPOINTS, "metrics.json", "metrics.csv", "model"}:
        raise InvalidArgumentError(f"-o {out} exists and holds other files ({', '.join(sorted(entries))}); "
                                   "choose another directory or pass --force to replace it")


def _model(args: argparse.Namespace):
    from .. import sources

    return sources.create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)


def run_transfer(args: argparse.Namespace) -> dict[str, Any]:
    """Run the recipe the flags describe; returns the CLI's result document.

    Example:
        >>> from graphprune.cli import main
        >>> main(["transfer", "resnet18", "--data", "/nonexistent", "-o", "/tmp/x"])  # doctest: +SKIP
        2
    """
    import graphprune.recipes as R

    from .. import io as gp_io
    from .checkpoint import atomic_write_text

    out = Path(args.output)
    config = _configs(args)  # every flag checked before any data is read
    R.check_splits(args.data, ("train", "val"))
    _prepare_output(out, args.force)
    model = _model(args)
    data = R.image_folder_data(args.data, model, image_size=args.image_size, batch_size=args.batch_size,
                               seed=args.seed, num_workers=args.workers)
    recipe = {"s_to_t": R.s_to_t, "s_tp_t": R.s_tp_t, "sp_t": R.sp_t, "transtailor": R.transtailor}[args.recipe]
    result_model, result = recipe(model, data, config)
    document = json.loads(result.to_json())
    test_root = Path(args.data) / "test"
    if test_root.is_dir():  # reporting only: no decision above read the test split
        test = R.eval_loader(args.data, "test", model, image_size=args.image_size, batch_size=args.batch_size)
        placement = R.Placement(device=next(result_model.parameters()).device)
        document["test_accuracy"] = R.evaluate(result_model, R.DeviceLoader(test, placement))
    gp_io.save(result_model.cpu(), out / "model")
    atomic_write_text(out / "metrics.json", json.dumps(document, indent=2))
    atomic_write_text(out / "metrics.csv", R.records_csv(result.recipe, result.stages))
    lines = [f"{result.recipe} on {args.data}: {len(data.class_names)} classes"]
    for stage in result.stages:
        lines.append(f"  {stage.name:<14} val {stage.val_accuracy:.3f}  MACs {stage.macs / 1e6:8.1f}M  "
                     f"params {stage.params / 1e6:.3f}M  {stage.seconds:7.1f} s")
    lines.append(f"returned {result.final.name}: val {result.val_accuracy:.3f}, FLOPs reduction "
                 f"{result.flops_reduction:.3f}" + (f", test {document['test_accuracy']:.3f}"
                                                     if "test_accuracy" in document else ""))
    lines.append(f"wrote {out / 'model'}, {out / 'metrics.json'}, {out / 'metrics.csv'}")
    return {"_text": "\n".join(lines), "output": str(out), "metrics": document}
