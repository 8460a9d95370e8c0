"""Speed benchmark: does removing X% of the MACs make a model X% faster on a CPU?

For each model and FLOPs budget (fraction of fvcore MACs removed), pruned copies are made
(three by default) from the same seeded random weights:

* graphprune: ``gp.prune(model, x, flops_reduction=budget, scorer="l1",
  config=gp.PlanConfig(round_to=r))`` with ``r`` = 1 and 8 (it searches the channel selection
  itself and verifies with fvcore; the classifier's outputs are frozen as model outputs).
* Torch-Pruning: ``MetaPruner(importance=MagnitudeImportance(p=1), pruning_ratio=p,
  round_to=r)`` (local, uniform: every group loses the fraction ``p``), set up as
  ``_common.tp_pruner``. ``p`` is searched so that the measured MACs reduction matches the
  budget: bracketed bisection with linear interpolation on ``p`` in [0, 0.95], starting at
  ``1 - sqrt(1 - budget)`` (MACs of a layer scale with cin * cout), each step pruning a fresh
  copy and counting its MACs with ``graphprune.measurement.count_macs`` (fvcore, the same
  count as every other row); it stops within ``Config.tp_tolerance`` (0.5 point) of the
  budget, when the bracket is narrower than 0.001, or after ``Config.tp_steps`` steps, and
  keeps the closest copy.

* graphprune by latency target: ``gp.prune(model, x, latency_reduction=budget,
  latency_config=LatencyConfig(batch_size=b, threads=threads))``, the budget read as a fraction
  of the measured latency at batch ``b`` (variant ``graphprune_latency:B``; its ``round_to``
  column is empty, the planner keeps multiples of 8). ``latency_predicted`` and
  ``latency_measured`` are what the prune itself predicted and measured; the row's latency
  columns are this script's own interleaved timing.

Then every copy of one model (the unpruned baseline included) is timed with
``graphprune.measurement.measure_latency`` (inference mode, eval, GC paused,
``torch.set_num_threads(threads)``) at batch 1 and batch 16, *interleaved*: ``--rounds``
rounds, in each round every copy gets one untimed pass and ``repeats`` timed passes, the
order rotated from round to round. Background load then slows before and after alike
instead of biasing one of them. The median, p10 and p90 are over the pooled passes.

Per row: MACs and params (``graphprune.measurement.measure``), latency at batch 1 and 16,
speedup ``t_before / t_after`` (``compare``), MACs ratio ``macs_before / macs_after`` (what
the speedup would be if time were proportional to MACs, the physical limit) and efficiency
``speedup / macs_ratio`` (issue 7 aims at >= 0.9 at batch 16 and >= 0.8 at batch 1). Every row
records the environment and the 1-minute load average at start and end of the run and of the
model's timing; before each model's timing the run waits (up to ``max_wait_s``) for the load to
fall below ``max_load`` (0.5) and records the wait (``waited_model_s``). With ``onnxruntime``
installed, each copy is also exported (``torch.onnx.export``, static shapes) and timed in an
``InferenceSession`` with ``intra_op_num_threads=threads`` (``ort_ms_b1``, ``ort_ms_b16``,
``ort_speedup_b*``: what users deploy on CPU); ``--no-onnx`` skips it.

Example:
    python benchmarks/speed.py --quick
    python benchmarks/speed.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import math
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import attention_qkv, environment_columns, finish_report, search_ratio, tp_pruner, tp_update_heads  # noqa: E402

RESULTS = HERE / "results"
BATCHES = (1, 16)
COLUMNS = (
    "model", "budget", "tool", "round_to", "status", "error",
    "macs", "params", "macs_kept", "params_kept", "macs_reduction", "macs_ratio",
    "tp_ratio", "tp_steps", "prune_s",
    "latency_batch", "latency_predicted", "latency_measured",
    "latency_ms_b1", "latency_ms_b1_p10", "latency_ms_b1_p90", "samples_b1",
    "latency_ms_b16", "latency_ms_b16_p10", "latency_ms_b16_p90", "samples_b16",
    "speedup_b1", "speedup_b16", "efficiency_b1", "efficiency_b16", "speedup_p10_b1", "speedup_p10_b16",
    "ort_ms_b1", "ort_ms_b16", "ort_speedup_b1", "ort_speedup_b16",
    "input_size", "seed", "rounds", "repeats_b1", "repeats_b16", "threads",
    "load_run_start", "load_run_end", "load_timing_start", "load_timing_end", "waited_s", "waited_model_s", "nice", "notes",
    "torch", "timm", "torch_pruning", "graphprune", "python", "cpu", "date",
)
TARGET_EFFICIENCY = {1: 0.8, 16: 0.9}  # issue 7


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("resnet50", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224",
                               "mobilenetv3_large_100")
    budgets: tuple[float, ...] = (0.3, 0.5)  # fraction of MACs removed
    # (tool, round_to) pairs; Torch-Pruning with round_to=8 is one flag away (--variants) but
    # costs a long ratio search (its MACs move in steps), so it is not in the default run
    # graphprune_latency:B: the latency target at batch B (the int is the batch, not a round_to)
    variants: tuple[tuple[str, int], ...] = (("graphprune", 1), ("graphprune", 8), ("torch_pruning", 1),
                                             ("graphprune_latency", 1), ("graphprune_latency", 16))
    threads: int = 2  # torch.set_num_threads, fixed for the whole run
    rounds: int = 5  # interleaved timing rounds (see the module docstring)
    repeats_b1: int = 6  # timed passes per copy per round at batch 1
    repeats_b16: int = 2  # ... at batch 16
    seed: int = 0
    tp_tolerance: float = 0.005  # stop the Torch-Pruning ratio search this close to the budget
    tp_steps: int = 12  # at most this many Torch-Pruning prunes per search
    max_load: float = 0.5  # wait at start and before each model's timing while the load is above this ...
    max_wait_s: float = 600.0  # ... for at most this long, checking every 30 s
    nice: int = 0  # added to this process's niceness (every thread); < 0 needs root, see README
    onnx: bool = True  # also time every copy in ONNX Runtime (skipped when it is not installed)


QUICK = Config(models=("resnet50", "vit_small_patch16_224"), budgets=(0.3,), rounds=3, repeats_b1=5,
               repeats_b16=1)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def niceness(increment: int) -> Iterator[int]:
    """Run with ``increment`` added to this process's niceness; yields the resulting niceness.

    Linux keeps a niceness per thread and ``os.nice`` changes only the caller's, so each thread
    in ``/proc/self/task`` is set; threads started later (torch's OpenMP pool) inherit it from
    the main thread. With scheduler autogroups (``/proc/sys/kernel/sched_autogroup_enabled``)
    a niceness only ranks threads within their session's group, so the group's nice
    (``/proc/self/autogroup``) is set to the same value too, and restored on exit, SIGTERM
    included (it outlives the process).
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if increment == 0:
        yield current
        return
    target = current + increment
    autogroup = Path("/proc/self/autogroup")
    group_nice = autogroup.read_text().split()[-1] if autogroup.exists() else None
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` runs on kill
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), target)
        if group_nice is not None:
            autogroup.write_text(str(target))
        yield target
    finally:
        if group_nice is not None:
            autogroup.write_text(group_nice)
        signal.signal(signal.SIGTERM, previous_handler)


def wait_for_quiet(cfg: Config) -> float:
    """Wait while the load average is above ``cfg.max_load``, up to ``cfg.max_wait_s``; seconds waited."""
    start = time.monotonic()
    while load1() > cfg.max_load and time.monotonic() - start < cfg.max_wait_s:
        print(f"  load average {load1()} > {cfg.max_load}; waiting", flush=True)
        time.sleep(30)
    return round(time.monotonic() - start)


# --------------------------------------------------------------------------- pruning


def prune_graphprune(model, x, budget: float, round_to: int, row: dict):
    import graphprune as gp

    # no ignore: the classifier's outputs are model outputs, frozen by the graph itself, and its
    # inputs stay prunable, as with Torch-Pruning's ignored_layers
    return gp.prune(model, x, flops_reduction=budget, scorer="l1", config=gp.PlanConfig(round_to=round_to))


def prune_graphprune_latency(model, x, budget: float, batch: int, row: dict, cfg: Config):
    import graphprune as gp
    from graphprune.latency import LatencyConfig

    pruned = gp.prune(model, x, latency_reduction=budget, scorer="l1",
                      latency_config=LatencyConfig(batch_size=batch, threads=cfg.threads))
    record = pruned.graphprune_latency
    row.update(latency_batch=batch, latency_predicted=record["predicted"], latency_measured=record["measured"])
    if not record["reached"]:
        row["notes"] += f"prune measured {record['measured']:.3f} after {len(record['steps'])} tries; "
    return pruned


def ort_latency(model, x, batch: int, threads: int, rounds: int, repeats: int) -> float:
    """Median ms of ``model`` exported to ONNX and run by onnxruntime's CPU provider."""
    import tempfile

    import numpy as np
    import onnxruntime
    import torch

    inputs = x.repeat(batch, *([1] * (x.dim() - 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (inputs,), str(path), input_names=["x"], dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": inputs.numpy()}
    session.run(None, feed)  # untimed: allocation, kernel selection
    samples = []
    for _ in range(rounds * repeats):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


def _tp_prune_copy(model, x, ratio: float, round_to: int):
    import graphprune as gp
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    heads = attention_qkv(pruned)
    fused = {m: m.fused_attn for m in heads if hasattr(m, "fused_attn")}
    try:
        for m in fused:  # trace the explicit attention, as Torch-Pruning's timm examples do
            m.fused_attn = False
        ignored = [pruned.get_submodule(name) for name in gp.classifier_names(pruned)]
        pruner = tp_pruner(pruned, x, tp.importance.MagnitudeImportance(p=1), ratio, ignored, heads,
                           round_to=None if round_to == 1 else round_to)
        pruner.step()
        tp_update_heads(heads, pruner)
    finally:
        for m, flag in fused.items():
            m.fused_attn = flag  # every copy is timed with the same attention kernel
    return pruned.eval()


def prune_torch_pruning(model, x, budget: float, round_to: int, row: dict, cfg: Config):
    """Search Torch-Pruning's channel ratio until the MACs reduction matches ``budget``."""
    from graphprune.measurement import count_macs

    pruned, ratio, steps = search_ratio(lambda r: _tp_prune_copy(model, x, r, round_to), lambda m: count_macs(m, x),
                                        count_macs(model, x), budget, tolerance=cfg.tp_tolerance,
                                        max_steps=cfg.tp_steps)
    row["tp_steps"] = steps
    row["tp_ratio"] = round(ratio, 4)
    return pruned


# --------------------------------------------------------------------------- timing


def time_interleaved(models: dict, x, batch: int, repeats: int, cfg: Config) -> dict:
    """Pooled latency samples per key of ``models``, measured in rotated round-robin order."""
    from graphprune.measurement import measure_latency

    keys = list(models)
    samples = {k: [] for k in keys}
    for k in keys:  # one untimed pass each: allocator, lazy init, weight repacking
        measure_latency(models[k], x, batch_size=batch, threads=cfg.threads, warmup=0, repeats=1)
    for r in range(cfg.rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            stats = measure_latency(models[k], x, batch_size=batch, threads=cfg.threads, warmup=1, repeats=repeats)
            samples[k] += stats.samples_ms
    return samples


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --------------------------------------------------------------------------- one model


def run_model(name: str, cfg: Config, common: dict) -> list[dict]:
    import timm
    import torch
    from graphprune.measurement import compare, measure

    torch.manual_seed(cfg.seed)
    model = timm.create_model(name, pretrained=False).eval()
    input_size = timm.data.resolve_data_config(model=model)["input_size"]
    x = torch.randn(1, *input_size)
    base = measure(model, x, latency=False, threads=cfg.threads)
    common = {**common, "model": name, "input_size": "x".join(map(str, input_size))}
    rows = [{**common, "budget": 0.0, "tool": "baseline", "round_to": "", "status": "ok"}]
    copies = {0: model}
    for budget in cfg.budgets:
        for tool, round_to in cfg.variants:
            row = {**common, "budget": budget, "tool": tool, "round_to": round_to, "status": "error", "notes": ""}
            start = time.perf_counter()
            try:
                if tool == "graphprune":
                    pruned = prune_graphprune(model, x, budget, round_to, row)
                elif tool == "graphprune_latency":
                    row["round_to"] = ""
                    pruned = prune_graphprune_latency(model, x, budget, round_to, row, cfg)
                else:
                    pruned = prune_torch_pruning(model, x, budget, round_to, row, cfg)
                row["prune_s"] = round(time.perf_counter() - start, 1)
                with torch.no_grad():
                    out = pruned.eval()(x)
                if tuple(out.shape) != (1, model.num_classes):
                    raise RuntimeError(f"pruned output shape {tuple(out.shape)}")
                row["status"] = "ok"
                copies[len(rows)] = pruned
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                frame = traceback.extract_tb(error.__traceback__)[-1]
                row["notes"] += f"raised at {Path(frame.filename).name}:{frame.lineno}; "
            rows.append(row)
            print(f"  {name:<24}{budget:<5}{tool:<15}r{round_to:<3}{row['status']:<6}"
                  f"prune_s={row.get('prune_s', '-')} tp_ratio={row.get('tp_ratio', '-')} {row.get('error', '')}",
                  flush=True)
    measured = {i: measure(m, x, latency=False, threads=cfg.threads) for i, m in copies.items()}

    waited_model = wait_for_quiet(cfg)
    load_start = load1()
    latency = {}
    for batch, repeats in zip(BATCHES, (cfg.repeats_b1, cfg.repeats_b16)):
        t0 = time.perf_counter()
        latency[batch] = time_interleaved(copies, x, batch, repeats, cfg)
        print(f"  {name}: batch {batch} timed in {time.perf_counter() - t0:.0f} s", flush=True)
    load_end = load1()
    ort = {}
    if cfg.onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("  onnxruntime not installed: no ONNX Runtime columns", flush=True)
        else:
            for i, m in copies.items():
                for batch, repeats in zip(BATCHES, (cfg.repeats_b1, cfg.repeats_b16)):
                    try:
                        ort[i, batch] = ort_latency(m, x, batch, cfg.threads, cfg.rounds, repeats)
                    except Exception as error:  # an export failure is a note, not a lost row
                        rows[i]["notes"] = (rows[i].get("notes") or "") + \
                            f"onnx b{batch}: {type(error).__name__}: {str(error).splitlines()[0][:120]}; "

    for i, m in measured.items():
        row = rows[i]
        row.update(macs=m.macs, params=m.params, macs_kept=m.macs / base.macs, params_kept=m.params / base.params,
                   macs_reduction=1 - m.macs / base.macs, macs_ratio=base.macs / m.macs,
                   load_timing_start=load_start, load_timing_end=load_end, waited_model_s=waited_model)
        for batch in BATCHES:
            if (i, batch) in ort:
                row[f"ort_ms_b{batch}"] = ort[i, batch]
                if (0, batch) in ort:
                    row[f"ort_speedup_b{batch}"] = ort[0, batch] / ort[i, batch]
        for batch in BATCHES:
            samples = latency[batch][i]
            median = statistics.median(samples)
            row.update({f"latency_ms_b{batch}": median, f"latency_ms_b{batch}_p10": _percentile(samples, 0.1),
                        f"latency_ms_b{batch}_p90": _percentile(samples, 0.9), f"samples_b{batch}": len(samples)})
            before = dataclasses.replace(base, latency_ms_median=statistics.median(latency[batch][0]),
                                         batch_size=batch)
            after = dataclasses.replace(m, latency_ms_median=median, batch_size=batch)
            speedup = compare(before, after).row("latency_ms").speedup_x
            row.update({f"speedup_b{batch}": speedup, f"efficiency_b{batch}": speedup / row["macs_ratio"],
                        f"speedup_p10_b{batch}": _percentile(latency[batch][0], 0.1) / row[f"latency_ms_b{batch}_p10"]})
        if row["tool"] == "graphprune_latency":  # its budget is latency at its own batch, timed here
            batch = int(row["latency_batch"])
            reduction = 1 - row[f"latency_ms_b{batch}"] / statistics.median(latency[batch][0])
            if abs(reduction - row["budget"]) > 0.02:
                row["notes"] = (row.get("notes") or "") + f"latency reduction here {reduction:.3f} at batch {batch}; "
        elif i and abs(row["macs_reduction"] - row["budget"]) > 0.01:
            row["notes"] = (row.get("notes") or "") + f"MACs reduction {row['macs_reduction']:.3f} misses the budget; "
    del copies, model
    gc.collect()
    return rows


# --------------------------------------------------------------------------- output


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _round_cell(row: dict) -> str:
    """round_to, or for a latency-targeted row the batch its target was measured at (b1, b16)."""
    return row["round_to"] or (f"b{row['latency_batch']}" if row.get("latency_batch") else "")


def summarize(rows: list[dict]) -> str:
    """The table of the issue: model, budget, tool, round_to, kept fractions, speedups, efficiencies."""
    env = rows[0]
    lines = [f"torch {env['torch']}, timm {env['timm']}, torch-pruning {env['torch_pruning']}, {env['cpu']}, "
             f"{env['threads']} threads, {env['date']}; load average {env['load_run_start']} at start, "
             f"{env['load_run_end']} at end (waited {env['waited_s']} s), niceness {env.get('nice', '')}",
             "speedup = latency before / after (median); eff = speedup / (MACs before / MACs after); "
             "targets: eff >= 0.8 at batch 1, >= 0.9 at batch 16; p10 sp = the same speedup from the "
             "10th-percentile latencies (less sensitive to background load)",
             "",
             f"{'model':<23}{'budget':>6} {'tool':<19}{'round':>5}{'MACs kept':>10}{'params kept':>12}"
             f"{'ms b1':>9}{'ms b16':>9}{'speedup b1':>11}{'speedup b16':>12}{'eff b1':>8}{'eff b16':>8}"
             f"{'p10 sp b1':>10}{'p10 sp b16':>11}  notes"]
    hits = {b: [0, 0] for b in BATCHES}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<23}{_num(r['budget']):>6.2f} {r['tool']:<19}{_round_cell(r):>5}  "
                         f"failed: {r['error'][:90]}")
            continue
        cells = []
        for b in BATCHES:
            eff = _num(r[f"efficiency_b{b}"])
            if r["tool"] != "baseline":
                hits[b][0] += eff >= TARGET_EFFICIENCY[b]
                hits[b][1] += 1
            cells.append(f"{eff:.2f}" + ("" if r["tool"] == "baseline" or eff >= TARGET_EFFICIENCY[b] else "*"))
        lines.append(f"{r['model']:<23}{_num(r['budget']):>6.2f} {r['tool']:<19}{_round_cell(r):>5}"
                     f"{_num(r['macs_kept']):>10.3f}{_num(r['params_kept']):>12.3f}"
                     f"{_num(r['latency_ms_b1']):>9.1f}{_num(r['latency_ms_b16']):>9.1f}"
                     f"{_num(r['speedup_b1']):>11.2f}{_num(r['speedup_b16']):>12.2f}{cells[0]:>8}{cells[1]:>8}"
                     f"{_num(r.get('speedup_p10_b1')):>10.2f}{_num(r.get('speedup_p10_b16')):>11.2f}"
                     f"  {r.get('notes', '')}".rstrip())
    lines += ["", "* below the target. Pruned rows meeting the target: "
              + ", ".join(f"batch {b}: {h}/{n}" for b, (h, n) in hits.items())]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """MACs ratio (x) against measured speedup (y), batch 1 and batch 16, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["tool"] != "baseline"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = dict(zip(models, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    markers = {("graphprune", "1"): "o", ("graphprune", "8"): "s", ("torch_pruning", "1"): "^",
               ("torch_pruning", "8"): "v", ("graphprune_latency", ""): "D"}
    x_top = max([_num(r["macs_ratio"]) for r in ok] + [1.5]) * 1.1
    y_top = max([x_top] + [min(_num(r[f"speedup_b{b}"]), 2 * x_top) for r in ok for b in BATCHES]) * 1.05
    y_low = min([0.7] + [_num(r[f"speedup_b{b}"]) for r in ok for b in BATCHES]) * 0.9
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), sharey=True)
    for ax, batch in zip(axes, BATCHES):
        line = [1.0, x_top]
        ax.plot(line, line, "k-", lw=1, label="speedup = MACs ratio")
        ax.plot(line, [TARGET_EFFICIENCY[batch] * v for v in line], "k:", lw=1,
                label=f"{TARGET_EFFICIENCY[batch]} x MACs ratio (issue 7 target)")
        for r in ok:  # a speedup beyond the frame is drawn on its top edge
            ax.plot(_num(r["macs_ratio"]), min(_num(r[f"speedup_b{batch}"]), y_top),
                    markers.get((r["tool"], r["round_to"]), "x"), color=colors[r["model"]],
                    mfc="none" if r["tool"] == "torch_pruning" else colors[r["model"]], ms=8, mew=1.5, ls="none")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("MACs ratio (MACs before / after)")
        ax.set_xlim(1.0, x_top)
        ax.set_ylim(y_low, y_top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("latency speedup (median before / after)")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="none", label=m) for m in models]
    handles += [plt.Line2D([], [], color="gray", marker=mk, ls="none", mfc="none" if t == "torch_pruning" else "gray",
                           label={"graphprune": f"graphprune round_to={r}", "torch_pruning": f"Torch-Pruning round_to={r}"}.get(
                               t, "graphprune latency target"))
                for (t, r), mk in markers.items() if any((x["tool"], x["round_to"]) == (t, r) for x in ok)]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=4, frameon=False)
    env = rows[0]
    fig.suptitle(f"CPU speedup vs MACs ratio: torch {env['torch']}, {env['cpu']}, {env['threads']} threads, "
                 f"load {env['load_run_start']}->{env['load_run_end']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, out: Path, nice: int) -> None:
    """Measure every model of ``cfg`` and write ``out`` after each one."""
    import torch

    torch.set_num_threads(cfg.threads)
    load_start = load1()
    print(f"load average {load_start} at start; config {cfg}", flush=True)
    waited = wait_for_quiet(cfg)
    common = {**environment_columns(), "seed": cfg.seed, "rounds": cfg.rounds, "repeats_b1": cfg.repeats_b1,
              "repeats_b16": cfg.repeats_b16, "threads": torch.get_num_threads(), "load_run_start": load_start,
              "waited_s": waited, "nice": nice}
    rows: list[dict] = []
    for name in cfg.models:
        rows += run_model(name, cfg, common)
        write_csv(out, rows)  # a partial CSV survives a crash in a later model
    for row in rows:
        row["load_run_end"] = load1()
    write_csv(out, rows)


def _variant(text: str) -> tuple[str, int]:
    tool, _, round_to = text.partition(":")
    if tool not in ("graphprune", "torch_pruning", "graphprune_latency") or not round_to.isdigit() or int(round_to) < 1:
        raise SystemExit(f"bad variant {text!r}: expected graphprune:N, torch_pruning:N (N = round_to) "
                         "or graphprune_latency:B (B = batch), >= 1")
    return tool, int(round_to)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="resnet50 + vit_small at 30%%, fewer repeats, -> results/speed_quick.csv")
    parser.add_argument("--models", nargs="+", help="timm model names")
    parser.add_argument("--budgets", nargs="+", type=float, help="MACs reductions, e.g. 0.3 0.5")
    parser.add_argument("--variants", nargs="+", metavar="TOOL:ROUND_TO",
                        help="e.g. graphprune:1 graphprune:8 torch_pruning:1 torch_pruning:8 "
                             "graphprune_latency:1 graphprune_latency:16")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int, help="torch threads for the whole run (default 2)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", default=None,
                        help="skip the ONNX Runtime columns")
    parser.add_argument("--max-load", type=float, help="wait while the 1-minute load is above this (default 0.5)")
    parser.add_argument("--max-wait", type=float, help="seconds to wait for the load to drop (default 600)")
    parser.add_argument("--nice", type=int, help="add to the process niceness, e.g. -10 on a shared machine (root)")
    parser.add_argument("--out", type=Path, help="CSV (default results/speed.csv, or speed_quick.csv)")
    parser.add_argument("--replot", action="store_true", help="only redraw summary and plot from --out")
    args = parser.parse_args(argv)

    cfg = QUICK if args.quick else Config()
    overrides = {"models": args.models and tuple(args.models), "budgets": args.budgets and tuple(args.budgets),
                 "variants": args.variants and tuple(_variant(v) for v in args.variants),
                 "rounds": args.rounds, "max_wait_s": args.max_wait, "nice": args.nice, "onnx": args.onnx, "threads": args.threads,
                 "max_load": args.max_load}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or RESULTS / ("speed_quick.csv" if args.quick else "speed.csv")
    if not args.replot:
        with niceness(cfg.nice) as nice:  # before torch starts its thread pool
            run(cfg, out, nice)
    finish_report(out, read_csv(out), summarize, plot)


if __name__ == "__main__":
    main()
