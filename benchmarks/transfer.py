"""Transfer benchmark: ImageNet EfficientNet-Lite0 -> Flowers-17 at a 30 % FLOPs reduction.

For each seed, one CSV row per variant with validation and **test** accuracy, measured MACs
(``graphprune.measurement.count_macs`` at the benchmark's image size; one fused multiply-add
= one MAC) and the measured FLOPs reduction:

* ``S->T``: the fine-tuned full model (the reference; 0 % reduction).
* ``S->TP->T`` with the scorers ``l1``, ``random``, ``target_taylor``, ``classmean``, and with
  classifier reuse (``reuse``) and/or class-mean alignment (``align``, lambda = 1).
* ``SP->T``: prune the pretrained model (``l1``), then fine-tune with the same budget.

Every ``S->TP->T`` variant of a seed starts from that seed's ``S->T`` model (the stage
``s_tp_t`` would compute first with the same seed), then runs the public stage functions
``prune_stage_`` and ``finetune_`` exactly as ``s_tp_t`` does. Model selection never reads
the test split; test accuracy is measured once per final model, for reporting.

Rows carry the environment (``_common.environment_columns``) and the torch thread count.

Example:
    python benchmarks/transfer.py --quick          # ~10 min on 2 CPU cores
    python benchmarks/transfer.py --seeds 0 1 2    # the full configuration
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphprune.recipes as R  # noqa: E402
from _common import environment_columns  # noqa: E402
from graphprune.assets import load_efficientnet_lite0, shared_data_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration.

    Attributes:
        image_size: input side in pixels (Flowers-17 images are 144 px on the short side).
        train_per_class: training images per class (40 available).
        val_per_class: validation images per class (10 available).
        test_per_class: test images per class (30 available).
        flops_reduction: the budget of every pruned variant.
        source: S->T fine-tuning (linear probe first: cheap and stable with few images).
        target: fine-tuning after pruning; full, so BatchNorm statistics re-adapt.
        scoring_batches: batches the data-driven scorers read.
    """

    image_size: int = 128
    train_per_class: int | None = None
    val_per_class: int | None = None
    test_per_class: int | None = None
    flops_reduction: float = 0.3
    source: R.FinetuneConfig = R.FinetuneConfig(epochs=5, mode="full", lr=1e-3)
    target: R.FinetuneConfig = R.FinetuneConfig(epochs=5, mode="full", lr=1e-3)
    scoring_batches: int | None = None


FULL = Setup()
QUICK = Setup(image_size=80, train_per_class=8, val_per_class=5, test_per_class=10,
              source=R.FinetuneConfig(epochs=2, mode="linear", lr=1e-2),
              target=R.FinetuneConfig(epochs=2, mode="full", lr=2e-3), scoring_batches=2)

# (variant name, scorer, classifier reuse, alignment weight)
VARIANTS = (
    ("l1", "l1", False, 0.0),
    ("random", "random", False, 0.0),
    ("target_taylor", "target_taylor", False, 0.0),
    ("classmean", "classmean", False, 0.0),
    ("classmean+reuse", "classmean", True, 0.0),
    ("classmean+align", "classmean", False, 1.0),
    ("classmean+reuse+align", "classmean", True, 1.0),
)


def _row(recipe: str, variant: str, seed: int, setup: Setup, result: R.RecipeResult, test_accuracy: float,
         seconds: float, prune: R.PruneConfig | None) -> dict:
    final = result.final
    return {
        "recipe": recipe, "variant": variant, "seed": seed, "scorer": prune.scorer if prune else "",
        "classifier_reuse": prune.classifier_reuse if prune else "", "alignment_weight": prune.alignment_weight if prune
        else "", "val_accuracy": round(final.val_accuracy, 4), "test_accuracy": round(test_accuracy, 4),
        "macs": final.macs, "params": final.params, "flops_reduction": round(result.flops_reduction, 4),
        "seconds": round(seconds, 1), "image_size": setup.image_size, "train_per_class": setup.train_per_class,
        "source_mode": setup.source.mode, "source_epochs": setup.source.epochs, "target_mode": setup.target.mode,
        "target_epochs": setup.target.epochs, "threads": torch.get_num_threads(), **environment_columns(),
    }


def run_seed(seed: int, setup: Setup, make_data: Callable[[], R.TransferData], test) -> list[dict]:
    """Every variant for one seed; each gets fresh loaders, so all see the same batches in the same order."""
    source = load_efficientnet_lite0()
    data = make_data()
    run = R.RunConfig(seed=seed, progress=False)
    rows = []
    start = time.perf_counter()
    full, result = R.s_to_t(source, data, R.TransferConfig(source=setup.source, run=run))
    rows.append(_row("S->T", "full", seed, setup, result, R.evaluate(full, test), time.perf_counter() - start, None))
    print(f"seed {seed} S->T val {result.val_accuracy:.3f}", flush=True)
    means = None
    for name, scorer, reuse, align in VARIANTS:
        start = time.perf_counter()
        prune = R.PruneConfig(scorer=scorer, flops_reduction=setup.flops_reduction, classifier_reuse=reuse,
                              alignment_weight=align, scoring_batches=setup.scoring_batches)
        model = copy.deepcopy(full)
        data = make_data()
        torch.manual_seed(seed)  # augmentation draws from the global RNG
        if align and means is None:
            means = R.stages.full_model_class_means(full, data, progress=False)
        prune_record = R.prune_stage_(model, data, prune, seed=seed, progress=False)
        target_record = R.finetune_(model, data, setup.target, name="target", freeze_classifier=reuse,
                                    class_means=means if align else None, alignment_weight=align, seed=seed,
                                    progress=False)
        recipe_result = R.RecipeResult("S->TP->T", (*result.stages, prune_record, target_record), result.base_macs)
        rows.append(_row("S->TP->T", name, seed, setup, recipe_result, R.evaluate(model, test),
                         time.perf_counter() - start, prune))
        print(f"seed {seed} S->TP->T {name}: val {target_record.val_accuracy:.3f} "
              f"(after pruning {prune_record.val_accuracy:.3f})", flush=True)
    start = time.perf_counter()
    prune = R.PruneConfig(scorer="l1", flops_reduction=setup.flops_reduction)
    data = make_data()
    model, sp_result = R.sp_t(source, data, R.TransferConfig(prune=prune, target=setup.target, run=run))
    rows.append(_row("SP->T", "l1", seed, setup, sp_result, R.evaluate(model, test), time.perf_counter() - start,
                     prune))
    print(f"seed {seed} SP->T l1: val {sp_result.val_accuracy:.3f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Mean test accuracy (± std over seeds) per variant, labelled with the measured FLOPs reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["recipe"], r["variant"]) for r in rows))
    labels, means, stds, reductions = [], [], [], []
    for recipe, variant in keys:
        chosen = [r for r in rows if (r["recipe"], r["variant"]) == (recipe, variant)]
        accuracies = [float(r["test_accuracy"]) for r in chosen]
        labels.append(f"{recipe}\n{variant}")
        means.append(statistics.mean(accuracies))
        stds.append(statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0)
        reductions.append(statistics.mean(float(r["flops_reduction"]) for r in chosen))
    fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 2, 4.5))
    bars = ax.bar(range(len(keys)), means, yerr=stds, capsize=3, color=["#888"] + ["#4a7"] * (len(keys) - 2) + ["#a74"])
    for bar, reduction in zip(bars, reductions):
        ax.annotate(f"-{reduction:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 4), textcoords="offset points")
    ax.set_xticks(range(len(keys)), labels, fontsize=7)
    ax.set_ylabel("Flowers-17 test accuracy")
    ax.set_ylim(0, 1)
    seeds = sorted({r["seed"] for r in rows})
    ax.set_title(f"EfficientNet-Lite0 -> Flowers-17, label: measured FLOPs reduction, seeds {seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, 96 px, short schedules (< 10 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (quick) or 0 1 2")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (the PNG goes next to it)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or RESULTS / ("transfer_quick.csv" if args.quick else "transfer.csv")
    root = shared_data_dir() / "flowers17"
    reference = load_efficientnet_lite0()
    rows: list[dict] = []
    for seed in seeds:
        def make_data(seed: int = seed) -> R.TransferData:
            return R.image_folder_data(root, reference, image_size=setup.image_size, batch_size=34,
                                       per_class=setup.train_per_class, val_per_class=setup.val_per_class, seed=seed)

        test = R.eval_loader(root, "test", reference, image_size=setup.image_size, per_class=setup.test_per_class)
        rows += run_seed(seed, setup, make_data, test)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:  # rewritten after every seed: partial results survive
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
