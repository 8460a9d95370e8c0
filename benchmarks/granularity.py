"""Granularity benchmark: test accuracy vs FLOPs and vs measured CPU latency for channel, kernel and
unstructured pruning of a pretrained model, zero-shot and after linear or full fine-tuning.

The two studies behind it:

* *Towards compute-optimal transfer learning* (zero-shot structured pruning of a pretrained
  ResNet-50): kernel (filter) pruning traded accuracy for FLOPs almost as well as unstructured
  pruning and better than channel pruning; weight magnitude beat random.
* *How well do sparse ImageNet models transfer?*: unstructured sparse backbones transferred by
  linear probing vs full fine-tuning with the mask kept; the two modes rank sparse models differently.

Per (task, seed): the dense references (LP: the linear probe; S->T: the probe, then full
fine-tuning), then for each granularity x budget (30 / 50 / 70 % of MACs) x signal,
:func:`graphprune.recipes.sp_t` (``PruneConfig.granularity``) three times: ``zero-shot`` (``target.epochs=0``:
probe fitted on the unpruned features, prune, BatchNorm shift), ``linear`` (then train
the classifier on the frozen pruned backbone) and ``full`` (then fine-tune everything; masks kept).

Every row: val / test accuracy, the MACs a dense kernel executes (``macs``), the *effective*
MACs (nonzero weights only: unstructured masks lower these, not ``macs``), the measured
reduction of the effective MACs, parameters and nonzero parameters, and the median CPU latency
(batch 1, ``--threads`` threads, ``graphprune.measurement.measure_latency``, p10 / p90 beside it,
and the 1-minute load average, since a busy machine slows every number) of the deployed model:
a smaller dense model (channel), gather + grouped convs (kernel), or the dense model with zeros
(unstructured, made permanent). Kernel-pruned models train and are evaluated as kernel-shaped
masks on the dense convs (the same function, at dense speed), then become ``KernelConv2d``
layers; ``deploy_max_abs_diff`` is the largest output change of that step. Plus the environment.

Tasks come from ``benchmarks/transfer.py`` (same data, image size, batch, splits): ``flowers17``
(ImageNet EfficientNet-Lite0 -> Flowers-17, 128 px) and ``gtsrb`` (CIFAR-10 ResNet-56 -> GTSRB, 32 px).

Example:
    python benchmarks/granularity.py --quick                      # a few minutes, one thread: smoke run
    python benchmarks/granularity.py --tasks flowers17 --seeds 0 1 2 --threads 4
    python benchmarks/granularity.py --report benchmarks/results/granularity.csv   # PNG + summary only
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphprune.recipes as R  # noqa: E402
from _common import environment_columns, write_report  # noqa: E402
from graphprune import sparsity as sp  # noqa: E402
from graphprune.assets import shared_data_dir  # noqa: E402
from graphprune.groups import classifier_names  # noqa: E402
from graphprune.measurement import count_macs, count_params, measure_latency  # noqa: E402
from transfer import FULL as TRANSFER_FULL, QUICK as TRANSFER_QUICK, load_source  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOCS_FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "granularity.png"
FIELDS = [
    "task", "granularity", "signal", "scope", "budget", "transfer", "seed", "val_accuracy", "test_accuracy",
    "macs", "effective_macs", "base_macs", "flops_reduction", "params", "nonzero_params", "sparsity",
    "keep_ratio", "latency_ms", "latency_ms_p10", "latency_ms_p90", "load_average", "deploy_max_abs_diff",
    "train_steps", "epochs", "seconds", "error",
    "image_size", "train_images", "test_images", "threads", "device", "torch", "timm", "torch_pruning",
    "graphprune", "python", "cpu", "date",
]
GRANULARITIES = ("channel", "unstructured", "kernel")  # kernel last: its CPU forward is the slowest
TRANSFERS = ("zero-shot", "linear", "full")


@dataclass(frozen=True)
class Setting:
    """What one task runs: budgets, signals, the two fine-tunings and the latency protocol."""

    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    signals: tuple[str, ...] = ("magnitude",)
    random_budget: float = 0.5  # the random-signal control runs at this budget only (zero-shot)
    linear: R.FinetuneConfig = R.FinetuneConfig(epochs=4, mode="linear", lr=1e-3)
    full: R.FinetuneConfig = R.FinetuneConfig(epochs=4, norm_stats="train")
    dense_epochs: float = 8.0
    latency_repeats: int = 30
    latency_warmup: int = 5
    image_size: int | None = None  # None: the task's
    per_class: tuple[int, int, int] | None = None  # None: the task's


SETTINGS = {"full": Setting(signals=("magnitude", "random")),
            "quick": Setting(budgets=(0.5,), signals=("magnitude",), linear=R.FinetuneConfig(epochs=1, mode="linear",
                                                                                             lr=1e-3),
                             full=R.FinetuneConfig(epochs=1, norm_stats="train"), dense_epochs=1.0,
                             # 32 px and 4 / 2 / 4 images per class: the kernel-pruned Lite0 runs at a
                             # fraction of the dense speed on a CPU, and the smoke run must stay < 5 min
                             latency_repeats=3, latency_warmup=1, image_size=32, per_class=(4, 2, 4))}


def _latency(model: nn.Module, image_size: int, threads: int, setting: Setting) -> dict:
    stats = measure_latency(model.cpu(), torch.zeros(1, 3, image_size, image_size), threads=threads,
                            repeats=setting.latency_repeats, warmup=setting.latency_warmup)
    return {"latency_ms": round(stats.median_ms, 3), "latency_ms_p10": round(stats.p10_ms, 3),
            "latency_ms_p90": round(stats.p90_ms, 3)}


def _deploy_(model: nn.Module, example: torch.Tensor) -> float:
    """Kernel masks -> KernelConv2d layers (the deployed form), in place; the largest output change."""
    with torch.no_grad():
        before = model.eval()(example)
        sp.kernel_convs_from_masks_(model)
        return float((model(example) - before).abs().max())


def _row(task_name: str, task, setting: Setting, model: nn.Module, data: R.TransferData, test, result, *,
         granularity: str, signal: str, scope: str, budget: float, transfer: str, seed: int, started: float,
         threads: int, base_macs: int) -> dict:
    example = data.example_inputs().to(next(model.parameters()).device)
    final = result.final
    # accuracy of the masked model (kernel: trained and evaluated as masks, at dense speed); then the
    # deployed form, whose MACs and latency are measured
    test_accuracy = round(R.evaluate(model, test), 4)
    masked_kernels = any(sp.kernel_mask_index(m) is not None for m in model.modules())
    deploy_diff = _deploy_(model, example) if masked_kernels else ""
    row = {"task": task_name, "granularity": granularity, "signal": signal, "scope": scope, "budget": budget,
           "transfer": transfer, "seed": seed, "val_accuracy": round(final.val_accuracy, 4),
           "test_accuracy": test_accuracy, "deploy_max_abs_diff": deploy_diff,
           "load_average": round(os.getloadavg()[0], 2), "macs": int(count_macs(model, example)),
           "base_macs": base_macs, "params": int(count_params(model)), "train_steps": final.steps,
           "epochs": round(final.epochs, 3), "image_size": task.image_size,
           "train_images": len(R.device.unwrap(data.train).dataset), "test_images": len(R.device.unwrap(test).dataset),
           "threads": threads, "device": str(example.device), **environment_columns()}
    weights = sp.maskable_modules(model, classifier_names(model))
    row["effective_macs"] = int(sp.effective_macs(model, example, weights))
    row["flops_reduction"] = round(1.0 - row["effective_macs"] / base_macs, 4)
    row["nonzero_params"] = sum(int((p != 0).sum()) for p in model.parameters())
    row["sparsity"] = round(sp.overall_sparsity(weights), 4) if weights else 0.0
    prune = next((s for s in result.stages if s.name == "prune"), None)
    if prune is not None and "keep_ratio" in prune.details:
        row["keep_ratio"] = round(prune.details["keep_ratio"], 4)
    row.update(_latency(model, task.image_size, threads, setting))  # last: moves it to the CPU
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="raise")
        if handle.tell() == 0:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})


def _variants(setting: Setting) -> list[tuple[str, str, float, str]]:
    """``(granularity, signal, budget, transfer)`` in run order: magnitude at every budget, random as a control."""
    out = []
    for budget in setting.budgets:
        for granularity in GRANULARITIES:
            out += [(granularity, "magnitude", budget, transfer) for transfer in TRANSFERS]
    if "random" in setting.signals:
        out += [(g, "random", setting.random_budget, "zero-shot") for g in GRANULARITIES]
    return out


def run_job(task_name: str, task, setting: Setting, seed: int, threads: int, out: Path) -> None:
    task = replace(task, image_size=setting.image_size or task.image_size,
                   per_class=setting.per_class or task.per_class)
    root = shared_data_dir() / task.dataset
    source = load_source(task.model)
    train_pc, val_pc, test_pc = task.per_class
    data = R.image_folder_data(root, source, image_size=task.image_size, batch_size=task.batch_size,
                               per_class=train_pc, val_per_class=val_pc, augment=task.augment, seed=seed)
    placement = R.Placement.resolve(source, "auto")
    test = R.DeviceLoader(R.eval_loader(root, "test", source, image_size=task.image_size, per_class=test_pc),
                          placement)
    run = R.RunConfig(seed=seed, progress=False)
    common = {"seed": seed, "threads": threads}
    started = time.perf_counter()
    probe, result = R.s_to_t(source, data, R.TransferConfig(source=R.FinetuneConfig(epochs=0), run=run))
    base_macs = result.base_macs
    for transfer, epochs in (("zero-shot", 0.0), ("full", setting.dense_epochs)):
        if epochs:
            started = time.perf_counter()
            probe, result = R.s_to_t(source, data, R.TransferConfig(source=replace(task.source, epochs=epochs),
                                                                     run=run))
        row = _row(task_name, task, setting, probe, data, test, result, granularity="dense", signal="", scope="",
                   budget=0.0, transfer=transfer, started=started, base_macs=base_macs, **common)
        append_row(out, row)
        print(f"{task_name} seed {seed} dense {transfer}: test {row['test_accuracy']} ({row['seconds']} s)", flush=True)
    for granularity, signal, budget, transfer in _variants(setting):
        target = {"zero-shot": R.FinetuneConfig(epochs=0), "linear": setting.linear, "full": setting.full}[transfer]
        scope = "global" if granularity == "unstructured" and signal == "magnitude" else "local"
        prune = R.PruneConfig(scorer="l1" if signal == "magnitude" else "random", flops_reduction=budget,
                              scope=scope if granularity == "unstructured" else "local", granularity=granularity,
                              keep_masks=granularity == "kernel")  # kernel: deployed in _row
        started = time.perf_counter()
        try:
            model, result = R.sp_t(source, data, R.TransferConfig(prune=prune, target=target, run=run))
            row = _row(task_name, task, setting, model, data, test, result, granularity=granularity, signal=signal,
                       scope=prune.scope, budget=budget, transfer=transfer, started=started, base_macs=base_macs,
                       **common)
        except Exception as error:  # one failing variant is a row, not a lost run
            row = {"task": task_name, "granularity": granularity, "signal": signal, "budget": budget,
                   "transfer": transfer, "seed": seed, "error": f"{type(error).__name__}: {error}"[:300],
                   **environment_columns()}
        append_row(out, row)
        print(f"{task_name} seed {seed} {granularity} {signal} -{budget:.0%} {transfer}: test "
              f"{row.get('test_accuracy', '-')} reduction {row.get('flops_reduction', '-')} latency "
              f"{row.get('latency_ms', '-')} ms ({row.get('seconds', '-')} s) {row.get('error', '')}", flush=True)


# --------------------------------------------------------------------------- report


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [r for r in csv.DictReader(handle) if not r["error"]]


def _mean(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def _cells(rows: list[dict]) -> dict[tuple, dict]:
    """Mean over seeds per (task, granularity, signal, budget, transfer)."""
    keys = dict.fromkeys((r["task"], r["granularity"], r["signal"], r["budget"], r["transfer"]) for r in rows)
    out = {}
    for key in keys:
        mine = [r for r in rows if (r["task"], r["granularity"], r["signal"], r["budget"], r["transfer"]) == key]
        out[key] = {"n": len(mine), **{k: _mean(mine, k) for k in ("test_accuracy", "flops_reduction", "latency_ms",
                                                                    "macs", "effective_macs")}}
    return out


def summary_text(rows: list[dict]) -> str:
    """The readings against the two papers' claims, computed from the rows (whichever way they come out)."""
    cells = _cells(rows)
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lines.append(f"{task}")
        for key, cell in cells.items():
            if key[0] == task:
                lines.append(f"  {key[1]:<12} {key[2]:<9} -{float(key[3]):.0%} {key[4]:<9} test "
                             f"{cell['test_accuracy']:.3f} (n={cell['n']})  effective reduction "
                             f"{cell['flops_reduction']:.3f}  MACs {cell['macs'] / 1e6:.1f}M  effective "
                             f"{cell['effective_macs'] / 1e6:.1f}M  latency {cell['latency_ms']:.2f} ms")
        budgets = sorted({k[3] for k in cells if k[0] == task and k[1] != "dense"}, key=float)
        for budget in budgets:
            def acc(g, transfer, signal="magnitude"):
                cell = cells.get((task, g, signal, budget, transfer))
                return cell["test_accuracy"] if cell else None

            zero = {g: acc(g, "zero-shot") for g in GRANULARITIES}
            if None not in zero.values():
                order = " > ".join(sorted(zero, key=zero.get, reverse=True))
                claim = zero["kernel"] >= zero["channel"]
                lines.append(f"  -{float(budget):.0%} zero-shot ranking: {order}; kernel >= channel "
                             f"(compute-optimal paper's claim): {'yes' if claim else 'no'}")
            linear = {g: acc(g, "linear") for g in GRANULARITIES}
            full = {g: acc(g, "full") for g in GRANULARITIES}
            if None not in linear.values() and None not in full.values():
                by_linear = sorted(linear, key=linear.get, reverse=True)
                by_full = sorted(full, key=full.get, reverse=True)
                lines.append(f"  -{float(budget):.0%} linear ranking {' > '.join(by_linear)}; full ranking "
                             f"{' > '.join(by_full)}; rankings differ (sparse-transfer paper's claim): "
                             f"{'yes' if by_linear != by_full else 'no'}")
            for g in GRANULARITIES:
                mag, rnd = acc(g, "zero-shot"), acc(g, "zero-shot", "random")
                if mag is not None and rnd is not None:
                    lines.append(f"  -{float(budget):.0%} {g}: magnitude {mag:.3f} vs random {rnd:.3f} zero-shot")
    return "\n".join(lines) + "\n"


COLORS = {"channel": "#1f77b4", "kernel": "#d62728", "unstructured": "#2ca02c"}
MARKERS = {"zero-shot": "o", "linear": "s", "full": "^"}


def plot(rows: list[dict], path: Path) -> None:
    """Per task: test accuracy vs effective MACs (left) and vs measured CPU latency (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 5 * len(tasks)), squeeze=False)
    for line, task in enumerate(tasks):
        flops_ax, latency_ax = axes[line]
        for key, cell in cells.items():
            if key[0] != task:
                continue
            if key[1] == "dense":
                for ax in (flops_ax, latency_ax):
                    ax.axhline(cell["test_accuracy"], color="black", lw=1, ls="--" if key[4] == "zero-shot" else ":",
                               label="dense, linear probe" if key[4] == "zero-shot" else "dense, S->T")
                continue
            hollow = key[2] == "random"
            style = {"color": COLORS[key[1]], "marker": MARKERS[key[4]], "linestyle": "none", "markersize": 7,
                     "markerfacecolor": "none" if hollow else COLORS[key[1]]}
            label = f"{key[1]} {key[4]}" + (" (random)" if hollow else "")
            flops_ax.plot(cell["effective_macs"] / 1e6, cell["test_accuracy"], label=label, **style)
            latency_ax.plot(cell["latency_ms"], cell["test_accuracy"], label=label, **style)
        for ax, xlabel in ((flops_ax, "effective MACs (M), nonzero weights only"),
                           (latency_ax, "CPU latency, batch 1 (ms, median)")):
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            budgets = sorted({float(k[3]) for k in cells if k[0] == task and k[1] != "dense"})
            ax.set_title(f"{task}: channel / kernel / unstructured at "
                         f"{' / '.join(f'{b:.0%}' for b in budgets)} of the MACs removed", fontsize=10)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path) -> None:
    write_report(out, read_rows(out), committed=RESULTS / "granularity.csv", docs_figure=DOCS_FIGURE, plot=plot,
                 summary_text=summary_text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, one budget, 1-epoch schedules")
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(TRANSFER_FULL),
                        help="tasks (default: flowers17; quick: flowers17)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for training and latency (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path, appended to (PNG and summary next to it)")
    parser.add_argument("--report", type=Path, default=None, help="only redraw the PNG and summary of this CSV")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report)
        return
    torch.set_num_threads(args.threads)
    tasks = TRANSFER_QUICK if args.quick else TRANSFER_FULL
    setting = SETTINGS["quick" if args.quick else "full"]
    names = args.tasks or ["flowers17"]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or RESULTS / ("granularity_quick.csv" if args.quick else "granularity.csv")
    if out.exists():
        print(f"appending to {out}; delete it for a fresh run", flush=True)
    for seed in seeds:
        for name in names:
            run_job(name, tasks[name], setting, seed, args.threads, out)
    report(out)


if __name__ == "__main__":
    main()
