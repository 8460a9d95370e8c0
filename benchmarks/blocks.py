"""Block removal benchmark (issue 9): how many residual blocks does each target task need?

ImageNet EfficientNet-Lite0 is fine-tuned on an easy target (hymenoptera: ants vs bees; GTSRB
traffic signs) and a hard one (CUB birds, 100 classes); then ``graphprune.recipes.block_search``
ranks its 9 removable MBConv blocks (learned NetTailor gates, weights frozen, teacher term)
and removes the k lowest for every k, fine-tuning each. Per target and k the CSV records
validation accuracy (what the search reads), test accuracy (reported only), MACs (fvcore),
parameters and CPU latency (batch 1, the run's image size, one thread, interleaved rounds). The summary applies the
recipe's rule at several tolerances and patiences: keep the largest k whose validation
accuracy is within tolerance of the teacher, walking k up and stopping after ``patience``
failures in a row.

    .venv/bin/python benchmarks/blocks.py --quick     # < 10 min on 2 cores -> results/blocks_quick.{csv,png}
    .venv/bin/python benchmarks/blocks.py             # the committed run     -> results/blocks.{csv,png}
    .venv/bin/python benchmarks/blocks.py --summarize results/blocks.csv   # redo the summary and plot only
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphprune.recipes as R  # noqa: E402
from _common import environment_columns  # noqa: E402
from graphprune.assets import load_efficientnet_lite0, shared_data_dir  # noqa: E402
from graphprune.blocks import GateConfig  # noqa: E402
from graphprune.measurement import count_macs, count_params, measure_latency  # noqa: E402
from graphprune.recipes.checkpoint import StageStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCES = (0.01, 0.03, 0.05)
PATIENCES = (None, 2, 1)  # None: every k (the recipe default, the definition); 2, 1: stop early after failures
CONTROL = "control"  # the teacher + one more fine-tuning stage, nothing removed
FIELDS = ["target", "difficulty", "seed", "stage", "blocks_removed", "blocks", "val_accuracy", "test_accuracy",
          "macs", "params", "flops_reduction", "latency_ms", "gate_scores", "seconds", "image_size",
          "train_per_class", "val_per_class", "test_per_class", "source_epochs", "step_epochs", "gate_epochs",
          "threads"]


@dataclass(frozen=True)
class Setup:
    """One run's scale: image size, images per class and epochs."""

    image_size: int
    train_per_class: dict[str, int | None]
    val_per_class: dict[str, int | None]
    test_per_class: dict[str, int | None]
    source_epochs: float
    step_epochs: float
    gate_epochs: float
    max_blocks: int | None


TARGETS = {"hymenoptera": "easy", "gtsrb_small": "easy", "cub100": "hard"}
QUICK = Setup(80, {"hymenoptera": 40, "gtsrb_small": 6, "cub100": 4}, {"hymenoptera": 15, "gtsrb_small": 3, "cub100": 2},
              {"hymenoptera": 30, "gtsrb_small": 4, "cub100": 3}, 1.0, 0.5, 2.0, 4)
# full splits at 128 px on the recipes' defaults (LP-FT teacher, frozen BN before removal, batch
# statistics after it): the teachers are the transfer benchmark's S->T, so they clear the linear probe
EVERY = {"hymenoptera": None, "gtsrb_small": None, "cub100": None}
FULL = Setup(128, EVERY, EVERY, EVERY, 6.0, 2.0, 2.0, None)
LATENCY_ROUNDS, LATENCY_REPEATS = 5, 5


def run_target(target: str, setup: Setup, seed: int, threads: int) -> list[dict]:
    root = shared_data_dir() / target
    source = load_efficientnet_lite0()
    data = R.image_folder_data(root, source, image_size=setup.image_size, batch_size=32,
                               per_class=setup.train_per_class[target], val_per_class=setup.val_per_class[target],
                               seed=seed)
    test = R.eval_loader(root, "test", source, image_size=setup.image_size, per_class=setup.test_per_class[target])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        config = R.BlockSearchConfig(
            source=R.FinetuneConfig(epochs=setup.source_epochs),
            scorer="gate", gates=GateConfig(epochs=setup.gate_epochs, complexity_weight=1.0, teacher_weight=1.0),
            tolerance=1.0,  # walk every k; the summary applies the stopping rule at several tolerances
            max_blocks=setup.max_blocks, finetune=R.FinetuneConfig(epochs=setup.step_epochs, norm_stats="train"),
            run=R.RunConfig(checkpoint_dir=folder, seed=seed, progress=False))  # every stage's model, for test/latency
        start = time.perf_counter()
        _, result = R.block_search(source, data, config)
        print(f"{target}: search {time.perf_counter() - start:.0f} s", flush=True)
        store = StageStore(folder, "BlockSearch", config.to_dict())
        example = data.example_inputs()
        models = {stage.name: store.load(stage.name).eval() for stage in result.stages}
        # control: the teacher fine-tuned once more, as every depth step is, with no block removed;
        # a depth step that beats the teacher but not this control gained from training, not removal
        control = copy.deepcopy(models["source"])
        record = R.finetune_(control, data, config.finetune, name=CONTROL, seed=seed, progress=False)
        models[CONTROL] = control.eval()
        stages = list(result.stages) + [record]
        latencies = interleaved_latency_ms(models, example, threads)
        for stage in stages:
            model = models[stage.name]
            latency = latencies[stage.name]
            rows.append({
                "target": target, "difficulty": TARGETS[target], "seed": seed, "stage": stage.name,
                "blocks_removed": stage.details.get("blocks_removed", 0),
                "blocks": " ".join(stage.details.get("blocks", [])),
                "val_accuracy": round(stage.val_accuracy, 4),
                "test_accuracy": round(R.evaluate(model, test), 4),
                "macs": count_macs(model, example), "params": count_params(model),
                "flops_reduction": round(1 - stage.macs / result.base_macs, 4) if result.base_macs else 0.0,
                "latency_ms": round(latency, 3),
                "gate_scores": " ".join(f"{k}={v:.3f}" for k, v in stage.details.get("scores", {}).items()),
                "seconds": round(stage.seconds, 1), "image_size": setup.image_size,
                "train_per_class": setup.train_per_class[target], "val_per_class": setup.val_per_class[target],
                "test_per_class": setup.test_per_class[target], "source_epochs": setup.source_epochs,
                "step_epochs": setup.step_epochs, "gate_epochs": setup.gate_epochs, "threads": threads,
            })
    return rows


def interleaved_latency_ms(models: dict[str, torch.nn.Module], example: torch.Tensor, threads: int) -> dict[str, float]:
    """Median batch-1 latency per model, timed in rotating rounds so background load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(LATENCY_ROUNDS):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            stats = measure_latency(models[name], example, threads=threads, warmup=1, repeats=LATENCY_REPEATS)
            times[name].append(stats.median_ms)
    return {name: statistics.median(values) for name, values in times.items()}


def selected_k(rows: list[dict], tolerance: float, patience: int | None = None) -> dict:
    """The recipe's rule (``BlockSearchConfig.patience``) on one target's steps: the largest k within
    ``tolerance`` of the teacher, walking k up and stopping after ``patience`` failures in a row."""
    teacher = next(r for r in rows if r["stage"] == "source")
    chosen, failures = teacher, 0
    for row in sorted((r for r in rows if r["stage"].startswith("depth-")), key=lambda r: r["blocks_removed"]):
        if row["val_accuracy"] >= teacher["val_accuracy"] - tolerance:
            chosen, failures = row, 0
            continue
        failures += 1
        if patience is not None and failures >= patience:
            break
    return chosen


def summary(rows: list[dict]) -> str:
    lines = ["target difficulty seed tolerance patience -> blocks_removed val test flops_reduction latency_ms "
             "(teacher val test latency_ms)"]
    keys = sorted({(r["target"], int(r["seed"])) for r in rows})
    for target, seed in keys:
        mine = [dict(r, val_accuracy=float(r["val_accuracy"]), blocks_removed=int(r["blocks_removed"]))
                for r in rows if r["target"] == target and int(r["seed"]) == seed]
        teacher = next(r for r in mine if r["stage"] == "source")
        probe = next((r for r in mine if r["stage"] == "probe"), None)
        if probe is not None:  # the linear probe on the same features: the teacher must clear it
            clears = float(teacher["test_accuracy"]) >= float(probe["test_accuracy"])
            lines.append(f"{target} linear probe: val {probe['val_accuracy']:.3f} test {float(probe['test_accuracy']):.3f}"
                         f"; teacher (S->T) val {teacher['val_accuracy']:.3f} test {float(teacher['test_accuracy']):.3f}"
                         f": teacher >= probe on test: {'yes' if clears else 'NO'}")
        control = next((r for r in mine if r["stage"] == CONTROL), None)
        if control is not None:
            lines.append(f"{target} control (teacher + one more fine-tuning): val {control['val_accuracy']:.3f} "
                         f"test {float(control['test_accuracy']):.3f}")
        for tolerance, patience in ((t, p) for t in TOLERANCES for p in PATIENCES):
            s = selected_k(mine, tolerance, patience)
            lines.append(f"{target} {teacher['difficulty']} {seed} {tolerance:.2f} {patience} -> {s['blocks_removed']} "
                         f"{s['val_accuracy']:.3f} {float(s['test_accuracy']):.3f} {float(s['flops_reduction']):.3f} "
                         f"{float(s['latency_ms']):.2f} ({teacher['val_accuracy']:.3f} "
                         f"{float(teacher['test_accuracy']):.3f} {float(teacher['latency_ms']):.2f})")
    lines += easy_vs_hard(rows)
    return "\n".join(lines)


def easy_vs_hard(rows: list[dict]) -> list[str]:
    """NetTailor's claim read off the runs: at each tolerance (every k walked), blocks removed per
    target, easy targets first; the claim holds when every easy target loses more blocks than
    every hard one."""
    lines = ["easy vs hard (NetTailor: easy targets lose more blocks at the same tolerance):"]
    for tolerance in TOLERANCES:
        removed: dict[str, list[int]] = {"easy": [], "hard": []}
        parts = []
        for target, seed in sorted({(r["target"], int(r["seed"])) for r in rows},
                                   key=lambda k: (TARGETS[k[0]] != "easy", k)):
            mine = [dict(r, val_accuracy=float(r["val_accuracy"]), blocks_removed=int(r["blocks_removed"]))
                    for r in rows if r["target"] == target and int(r["seed"]) == seed]
            k = selected_k(mine, tolerance)["blocks_removed"]
            removed[TARGETS[target]].append(k)
            parts.append(f"{target} ({TARGETS[target]}, seed {seed}) {k}")
        verdict = "n/a"
        if removed["easy"] and removed["hard"]:
            verdict = "holds" if min(removed["easy"]) > max(removed["hard"]) else "does not hold"
        lines.append(f"  tolerance {tolerance:.2f}: " + ", ".join(parts) + f" -> claim {verdict}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for column, ax in zip(("val_accuracy", "test_accuracy"), axes):
        for target in dict.fromkeys(r["target"] for r in rows):
            mine = sorted((r for r in rows if r["target"] == target and int(r["seed"]) == 0 and r["stage"] != CONTROL),
                          key=lambda r: int(r["blocks_removed"]))
            teacher = float(mine[0][column])
            xs = [100 * float(r["flops_reduction"]) for r in mine]
            ys = [float(r[column]) - teacher for r in mine]
            ax.plot(xs, ys, marker="o", label=f"{target} ({mine[0]['difficulty']}; teacher {teacher:.2f})")
            for r, x, y in zip(mine, xs, ys):
                ax.annotate(str(r["blocks_removed"]), (x, y), fontsize=7, xytext=(2, 3), textcoords="offset points")
        ax.set_xlabel("MACs removed by dropping blocks (%)")
        ax.set_ylabel(f"{column.replace('_', ' ')} - teacher's")
        ax.legend(fontsize=7)
    axes[0].axhline(-0.03, color="grey", linestyle=":", linewidth=1)
    axes[0].set_title("validation (what the search reads; dotted: 3-point tolerance)", fontsize=9)
    axes[1].set_title("test (reported only)", fontsize=9)
    fig.suptitle("EfficientNet-Lite0: k lowest-gated blocks removed (labels), then fine-tuned", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets and epochs (< 10 min on 2 cores)")
    parser.add_argument("--targets", nargs="+", default=None, choices=sorted(TARGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and timing (1 is "
                        "robust on a shared machine: OpenMP barriers stall under oversubscription)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--summarize", type=Path, default=None, help="only redo the summary and plot of a CSV")
    args = parser.parse_args(argv)
    if args.summarize is not None:
        with open(args.summarize, newline="") as handle:
            rows = list(csv.DictReader(handle))
        text = summary(rows)
        print(text)
        args.summarize.with_name(args.summarize.stem + "_summary.txt").write_text(text + "\n")
        plot(rows, args.summarize.with_suffix(".png"))
        return
    setup = QUICK if args.quick else FULL
    targets = args.targets or (["hymenoptera", "cub100"] if args.quick else ["hymenoptera", "gtsrb_small", "cub100"])
    out = args.out or RESULTS / ("blocks_quick.csv" if args.quick else "blocks.csv")
    torch.set_num_threads(args.threads)
    env = environment_columns()
    rows: list[dict] = []
    for seed in args.seeds:
        for target in targets:
            rows += [dict(r, **env) for r in run_target(target, setup, seed, args.threads)]
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as handle:  # rewritten after every target: partial runs are usable
                writer = csv.DictWriter(handle, fieldnames=FIELDS + list(env))
                writer.writeheader()
                writer.writerows(rows)
    text = summary(rows)
    print(text)
    out.with_name(out.stem + "_summary.txt").write_text(text + "\n")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
