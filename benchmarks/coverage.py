"""Coverage benchmark: which timm models can graphprune and Torch-Pruning prune, exactly, and how fast?

For every model of a list and each tool, one subprocess (with a timeout, so a crash or a
hang costs one row, not the sweep) builds the model with seeded random weights, prunes it
at ``--ratio`` and records one CSV row:

* ``status``: ``ok`` when pruning finished and the pruned model runs in eval mode (batch 1)
  and in train mode (batch 2) with its original output shapes; else ``error``, ``timeout``
  or ``crash``, with the first line of the error.
* ``exact``: zero-then-prune. Random channels of every group are zeroed in their producers,
  the zeroed model's eval output is recorded, exactly those channels are removed, and the
  output must not move: ``exact_rel_diff = max|y_pruned - y_zeroed| / max|y_zeroed|`` is at
  most ``--tolerance``. A model where nothing could be zeroed gets no verdict.
* ``macs_*`` (``graphprune.measurement.count_macs``, one fused multiply-add = one MAC) and
  ``params_*`` before and after; seconds for building the graph, pruning, and both.

Channels a statistic is taken over (layer norm, group norm, softmax) are left out of the
exactness test for both tools: zeroing them changes the statistic, so no removal can be
exact there. Random init leaves norms at affine 1/0 with running stats 0/1, some heads at
zero and layer scales at 1e-6, which would make almost any removal look exact; both tools
see these constants redrawn the same way first (``_randomize_inits_``).

graphprune: ``trace`` + ``find_groups`` (classifier ignored) is the graph time; scoring
(``l1``), ``make_plan`` and ``apply_verified_`` (removal plus one verifying forward, what
``gp.prune`` does) is the prune time. Exactness uses ``graphprune.testing.pick_channels`` /
``zero_channels_`` and ``make_plan(groups, removed=picked)`` on the same groups.

Torch-Pruning (1.6.1): building ``tp.pruner.MetaPruner(importance=MagnitudeImportance(p=1),
ignored_layers=[classifier])`` (it builds the DependencyGraph) is the graph time,
``pruner.step()`` plus the attention attribute update is the prune time. Attention follows
Torch-Pruning's timm examples: every module with an integer ``num_heads`` and a ``qkv``
Linear is passed in ``num_heads={qkv: heads}``; after the step ``num_heads``, ``head_dim``
(and timm >= 1.0.20's ``attn_dim``) are recomputed from ``qkv.out_features``; the worker
runs with ``TIMM_FUSED_ATTN=0`` as those examples do. Exactness runs the same pruner with
``RandomImportance`` and ``step(interactive=True)``; for each yielded group it zeroes the
out-channel indices of conv/linear weights and biases, batch-norm weight, bias and running
mean, and unwrapped parameters, then prunes the groups. Groups touching a layer/group norm
or a parametrized module it cannot zero are skipped (counted in ``notes``).

Example:
    python benchmarks/coverage.py --quick
    python benchmarks/coverage.py --models resnet18 'vit_*patch16_224'
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import attention_qkv, environment_columns, finish_report, tp_pruner, tp_update_heads  # noqa: E402
from models import LISTS  # noqa: E402

RESULTS = HERE / "results"
TOOLS = ("graphprune", "torch_pruning")
RESULT_TAG = "COVERAGE_RESULT "
COLUMNS = (
    "model", "tool", "status", "error",
    "exact", "exact_rel_diff", "exact_groups", "exact_channels", "exact_error",
    "macs_before", "macs_after", "params_before", "params_after",
    "graph_s", "prune_s", "total_s",
    "groups_found", "groups_pruned", "unsupported_ops", "unsupported_names", "notes",
    "ratio", "seed", "input_size", "timeout_s",
    "torch", "timm", "torch_pruning", "graphprune", "python", "cpu", "threads", "jobs", "date",
)


@dataclass(frozen=True)
class Config:
    ratio: float = 0.3  # fraction of each group's channels removed
    seed: int = 0  # torch.manual_seed before building the model and drawing inputs
    tolerance: float = 1e-5  # exactness: max relative output change after zero-then-prune
    timeout_s: float = 300.0  # per tool per model, for the whole subprocess
    threads: int = 0  # torch threads per worker; 0 = torch's default
    jobs: int = 1  # workers run in parallel


# --------------------------------------------------------------------------- worker side


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _randomize_inits_(model, seed: int) -> None:
    """Redraw what timm initializes to constants, so zero-then-prune can detect an error.

    Random-init norms are affine 1/0 with running stats 0/1, heads of some families are
    zero (mixer, resmlp) and layer scales are 1e-5 or 1e-6 (convnext, cait, resmlp): the
    output then hardly depends on the pruned channels and any removal looks exact. Norm
    layers get weight U(0.5, 1.5), bias N(0, 0.1^2), running mean N(0, 0.1^2) and variance
    U(0.5, 1.5); every other constant-valued parameter gets the same by kind (vectors named
    ``bias`` like biases, other vectors like scales, tensors N(0, 0.02^2)).
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed + 1)

    def scale(t):
        return 0.5 + torch.rand(t.shape, generator=gen)

    def shift(t):
        return 0.1 * torch.randn(t.shape, generator=gen)

    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, norms):
                continue
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(scale(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(shift(module.bias))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(shift(module.running_mean))
                module.running_var.copy_(scale(module.running_var))
        for name, param in model.named_parameters():
            if param.numel() < 2 or param.min() != param.max():
                continue
            if param.dim() >= 2:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(shift(param) if name.endswith("bias") else scale(param))


def _shapes(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [s for o in out for s in _shapes(o)]
    return []


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return _first_tensor(out[0])


def _forward_shapes(model, x, *, train: bool) -> list:
    import torch

    was_training = model.training
    try:
        model.train(train)
        with torch.set_grad_enabled(train):
            return _shapes(model(x))
    finally:
        model.train(was_training)


def _rel_diff(model, x, reference) -> float:
    import torch

    with torch.no_grad():
        out = _first_tensor(model.eval()(x))
    scale = reference.abs().max().item()
    return (out - reference).abs().max().item() / (scale if scale > 0 else 1.0)


class GraphpruneRunner:
    """The public verbs, timed; ``apply_verified_`` is what ``gp.prune`` applies with."""

    def prune_(self, model, x, cfg: Config, row: dict) -> None:
        import graphprune as gp
        from graphprune.api import apply_verified_

        start = time.perf_counter()
        graph = gp.trace(model, (x,))
        # no ignore: the classifier's outputs are model outputs, frozen by the graph itself
        groups = gp.find_groups(graph, model=model)
        built = time.perf_counter()
        self.groups = groups  # reused by exactness: the plan is data keyed by parameter names
        scores = gp.get_scorer("l1")(groups, model)
        plan = gp.make_plan(groups, scores, ratio=cfg.ratio)
        applied, failing = apply_verified_(model, groups, plan, (x,))
        done = time.perf_counter()
        row.update(graph_s=built - start, prune_s=done - built, total_s=done - start,
                   groups_found=len(groups), groups_pruned=len(applied.removed),
                   unsupported_ops=sum(graph.unsupported.values()),
                   unsupported_names=";".join(sorted(graph.unsupported)))
        if failing:
            row["notes"] += f"{len(failing)} groups dropped by verification; "

    def exactness(self, model, x, cfg: Config, row: dict) -> float | None:
        import torch
        import graphprune as gp
        from graphprune.testing import pick_channels, zero_channels_

        groups = getattr(self, "groups", None)
        if groups is None:  # pruning failed after tracing or before; trace again
            groups = gp.find_groups(gp.trace(model, (x,)), model=model)
        picked = pick_channels(groups, cfg.ratio, seed=cfg.seed, exact_only=True)
        row.update(exact_groups=len(picked), exact_channels=sum(len(c) for c in picked.values()))
        if not picked:
            return None
        zero_channels_(model, groups, picked, roles=("out",))
        with torch.no_grad():
            reference = _first_tensor(model.eval()(x))
        gp.apply_plan_(model, gp.make_plan(groups, removed=picked))
        return _rel_diff(model, x, reference)


class TorchPruningRunner:
    """Torch-Pruning 1.6.1 as its timm examples use it."""

    def _pruner(self, model, x, importance, cfg: Config):
        import graphprune as gp

        self.heads = attention_qkv(model)
        ignored = [model.get_submodule(name) for name in gp.classifier_names(model)]
        return tp_pruner(model, x, importance, cfg.ratio, ignored, self.heads)

    def _update_heads(self, pruner) -> None:
        tp_update_heads(self.heads, pruner)

    def prune_(self, model, x, cfg: Config, row: dict) -> None:
        import torch_pruning as tp

        start = time.perf_counter()
        pruner = self._pruner(model, x, tp.importance.MagnitudeImportance(p=1), cfg)
        built = time.perf_counter()
        n_groups = 0
        for group in pruner.step(interactive=True):  # the same loop as step(), counted
            group.prune()
            n_groups += 1
        self._update_heads(pruner)
        done = time.perf_counter()
        row.update(graph_s=built - start, prune_s=done - built, total_s=done - start, groups_pruned=n_groups)

    def exactness(self, model, x, cfg: Config, row: dict) -> float | None:
        import torch
        import torch_pruning as tp

        torch.manual_seed(cfg.seed)
        pruner = self._pruner(model, x, tp.importance.RandomImportance(), cfg)
        # Derived on the unpruned model, so their indices are right for zeroing. Removal
        # re-derives each group from its root, as step() does, because pruning one group
        # shifts the concat offsets another group's indices were computed with.
        groups = list(pruner.step(interactive=True))
        unwrapped = {id(u.parameters): u.pruning_dim for u in pruner.DG.unwrapped_parameters}
        kept = [g for g in groups if self._zeroable(g)]
        row["notes"] += f"tp exactness skipped {len(groups) - len(kept)} of {len(groups)} groups; "
        row.update(exact_groups=len(kept), exact_channels=sum(len(g[0].idxs) for g in kept))
        if not kept:
            return None
        with torch.no_grad():
            for group in kept:
                self._zero_producers(group, pruner.DG, unwrapped)
            reference = _first_tensor(model.eval()(x))
        for group in kept:
            root = group[0]
            idxs = [int(getattr(i, "idx", i)) for i in root.idxs]
            pruner.DG.get_pruning_group(root.dep.target.module, root.dep.handler, idxs).prune()
        self._update_heads(pruner)
        return _rel_diff(model, x, reference)

    @staticmethod
    def _zeroable(group) -> bool:
        from torch import nn

        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
                return False  # a statistic over the channels: zeroing is not removing
            known = (nn.Parameter, nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
            if isinstance(target, nn.Module) and not isinstance(target, known) \
                    and any(True for _ in target.parameters(recurse=False)):
                return False  # a parametrized module whose producer dims we do not know
        return True

    @staticmethod
    def _zero_producers(group, graph, unwrapped: dict) -> None:
        import torch
        from torch import nn

        for dep, idxs in group:
            target = dep.target.module
            index = torch.as_tensor([int(getattr(i, "idx", i)) for i in idxs], dtype=torch.long)
            if index.numel() == 0:
                continue
            out = graph.is_out_channel_pruning_fn(dep.handler)
            if isinstance(target, nn.Parameter):
                # additive (pos_embed) or multiplicative (layer scale): zeroing is right for both
                target.index_fill_(unwrapped.get(id(target), -1), index, 0.0)
            elif isinstance(target, nn.modules.batchnorm._BatchNorm):
                for tensor in (target.weight, target.bias, target.running_mean):
                    if tensor is not None:
                        tensor.index_fill_(0, index, 0.0)
            elif isinstance(target, nn.modules.conv._ConvNd):
                depthwise = target.groups == target.in_channels == target.out_channels
                if out or depthwise:
                    target.weight.index_fill_(1 if target.transposed else 0, index, 0.0)
                    if target.bias is not None:
                        target.bias.index_fill_(0, index, 0.0)
            elif isinstance(target, nn.Linear) and out:
                target.weight.index_fill_(0, index, 0.0)
                if target.bias is not None:
                    target.bias.index_fill_(0, index, 0.0)


RUNNERS = {"graphprune": GraphpruneRunner, "torch_pruning": TorchPruningRunner}


def run_worker(tool: str, name: str, cfg: Config) -> dict:
    """Everything measured for one model and one tool; never raises."""
    import timm
    import torch
    from graphprune.measurement import count_macs, count_params

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    row = {"model": name, "tool": tool, "status": "error", "error": "", "notes": "", "threads": torch.get_num_threads()}
    runner = RUNNERS[tool]()

    def macs(model, x):
        try:
            return count_macs(model, x)
        except Exception as error:  # measured, not fatal
            row["notes"] += f"count_macs failed ({_one_line(error)}); "
            return ""

    try:
        torch.manual_seed(cfg.seed)
        model = timm.create_model(name, pretrained=False)
        _randomize_inits_(model, cfg.seed)
        model.eval()
        input_size = timm.data.resolve_data_config(model=model)["input_size"]
        x = torch.randn(1, *input_size)
        x_train = torch.randn(2, *input_size)  # batch norm in train mode needs 2 samples
        row.update(input_size="x".join(map(str, input_size)), params_before=count_params(model),
                   macs_before=macs(model, x))
        eval_shapes = _forward_shapes(model, x, train=False)
        train_shapes = _forward_shapes(copy.deepcopy(model), x_train, train=True)
    except Exception as error:
        row["error"] = "model: " + _one_line(error)
        return row

    pruned = copy.deepcopy(model)
    try:
        runner.prune_(pruned, x, cfg, row)
        after = _forward_shapes(pruned, x, train=False)
        if after != eval_shapes:
            raise RuntimeError(f"eval output shapes changed from {eval_shapes} to {after}")
        row.update(params_after=count_params(pruned), macs_after=macs(pruned, x))
        after = _forward_shapes(pruned, x_train, train=True)
        if after != train_shapes:
            raise RuntimeError(f"train output shapes changed from {train_shapes} to {after}")
        row.update(status="ok")
    except Exception as error:
        row["error"] = _one_line(error)
        frame = traceback.extract_tb(error.__traceback__)[-1]
        row["notes"] += f"raised at {Path(frame.filename).name}:{frame.lineno}; "
    del pruned

    try:
        diff = runner.exactness(copy.deepcopy(model), x, cfg, row)
        if diff is not None:
            row.update(exact_rel_diff=diff, exact="yes" if diff <= cfg.tolerance else "no")
    except Exception as error:
        row["exact_error"] = _one_line(error)
        row["exact"] = "no"
    return row


# --------------------------------------------------------------------------- driver side


def environment(cfg: Config) -> dict:
    """Columns that make a row reproducible: versions, CPU, threads, date."""
    return {
        "ratio": cfg.ratio, "seed": cfg.seed, "timeout_s": cfg.timeout_s, "jobs": cfg.jobs,
        **environment_columns(),
    }


def run_isolated(tool: str, name: str, cfg: Config) -> dict:
    """Run one worker in a subprocess; a timeout or a crash becomes the row's status."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--models", name,
           "--config-json", json.dumps(dataclasses.asdict(cfg))]
    env = dict(os.environ)
    if tool == "torch_pruning":
        env["TIMM_FUSED_ATTN"] = "0"  # as Torch-Pruning's timm examples run
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "tool": tool, "status": "timeout", "error": f"no result after {cfg.timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    last = lines[-1].strip()[:300] if lines else f"exit code {proc.returncode}"
    return {"model": name, "tool": tool, "status": "crash",
            "error": f"exit {proc.returncode} after {time.perf_counter() - start:.0f} s: {last}"}


def resolve_models(patterns: list[str] | None, list_name: str) -> list[str]:
    import timm

    if not patterns:
        return list(LISTS[list_name])
    names: list[str] = []
    for pattern in patterns:
        found = timm.list_models(pattern)
        if not found:
            raise SystemExit(f"no timm model matches {pattern!r}")
        names += [n for n in found if n not in names]
    return names


def merge_csv(path: Path, rows: list[dict]) -> list[dict]:
    """Replace the (model, tool) rows present in ``rows``, keep the others, write."""
    fresh = {(r["model"], r["tool"]): r for r in rows}
    merged: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            for old in csv.DictReader(f):
                key = (old["model"], old["tool"])
                merged.append(fresh.pop(key) if key in fresh else old)
    merged += list(fresh.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in merged:
            writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})
    return merged


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarize(rows: list[dict]) -> str:
    """Success and exactness counts and median seconds per tool; one table, plain text."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    both = [m for m, t in by_model.items() if all(t.get(x, {}).get("status") == "ok" for x in TOOLS)]
    lines = [f"{len(by_model)} models; both tools ok on {len(both)}",
             f"{'tool':<14}{'ok':>8}{'exact':>12}{'med graph_s':>13}{'med prune_s':>13}{'med total_s':>13}"
             f"{'med total_s (both ok)':>23}{'med macs kept':>15}"]
    medians = {}
    for tool in TOOLS:
        tr = [r for r in rows if r["tool"] == tool]
        ok = [r for r in tr if r.get("status") == "ok"]
        judged = [r for r in tr if r.get("exact") in ("yes", "no")]
        exact = [r for r in judged if r["exact"] == "yes"]

        def med(key, subset):
            values = [v for v in (_num(r.get(key)) for r in subset) if v is not None]
            return statistics.median(values) if values else float("nan")

        kept = [_num(r.get("macs_after")) / _num(r.get("macs_before")) for r in ok
                if _num(r.get("macs_after")) and _num(r.get("macs_before"))]
        medians[tool] = med("total_s", [by_model[m][tool] for m in both])
        lines.append(f"{tool:<14}{len(ok):>4}/{len(tr):<3}{len(exact):>7}/{len(judged):<4}{med('graph_s', ok):>13.2f}"
                     f"{med('prune_s', ok):>13.2f}{med('total_s', ok):>13.2f}{medians[tool]:>23.2f}"
                     f"{(statistics.median(kept) if kept else float('nan')):>15.3f}")
    if medians["torch_pruning"] > 0:
        lines.append(f"ratio of medians (graphprune / torch_pruning, models both prune): "
                     f"{medians['graphprune'] / medians['torch_pruning']:.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Left: seconds per model and tool (log); right: ok / exact grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    get = {(r["model"], r["tool"]): r for r in rows}
    y = np.arange(len(models))
    fig, (ax_t, ax_g) = plt.subplots(1, 2, figsize=(12, 0.26 * len(models) + 1.8),
                                     gridspec_kw={"width_ratios": [3, 1.2]})
    colors = {"graphprune": "tab:blue", "torch_pruning": "tab:orange"}
    for k, tool in enumerate(TOOLS):
        seconds = [(_num(get.get((m, tool), {}).get("total_s")) or np.nan) for m in models]
        ok = [get.get((m, tool), {}).get("status") == "ok" for m in models]
        offset = (k - 0.5) * 0.4
        ax_t.barh(y + offset, [s if o else np.nan for s, o in zip(seconds, ok)], height=0.4,
                  color=colors[tool], label=tool)
        failed = [i for i, o in enumerate(ok) if not o]
        ax_t.plot([0.05] * len(failed), y[failed] + offset, "x", color=colors[tool])
    ax_t.set_xscale("log")
    ax_t.set_xlim(left=0.03)
    ax_t.set_xlabel("graph build + prune, seconds (x at left: failed)")
    ax_t.set_yticks(y, models, fontsize=7)
    ax_t.set_ylim(len(models) - 0.5, -0.5)  # same rows as the grid, first model on top
    ax_t.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    columns = [(t, key) for t in TOOLS for key in ("status", "exact")]
    grid = np.full((len(models), len(columns)), 0.5)
    for i, m in enumerate(models):
        for j, (tool, key) in enumerate(columns):
            value = get.get((m, tool), {}).get(key, "")
            grid[i, j] = {"ok": 1.0, "yes": 1.0, "": 0.5}.get(value, 0.0)
    ax_g.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax_g.set_xticks(range(len(columns)), ["gp ok", "gp exact", "tp ok", "tp exact"], fontsize=8, rotation=30)
    ax_g.set_yticks(y, [""] * len(models))
    ax_g.set_title("green pass, red fail, yellow n/a", fontsize=8)
    env = rows[0]
    fig.suptitle(f"Coverage at ratio {env.get('ratio')}: torch {env.get('torch')}, {env.get('cpu')}, "
                 f"{env.get('threads')} threads x {env.get('jobs')} jobs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="timm.list_models patterns (default: --list)")
    parser.add_argument("--list", default="issue", choices=sorted(LISTS), help="named list from benchmarks/models.py")
    parser.add_argument("--quick", action="store_true", help="the 'quick' list, written to coverage_quick.csv")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--ratio", type=float, default=Config.ratio)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--tolerance", type=float, default=Config.tolerance)
    parser.add_argument("--timeout", type=float, default=Config.timeout_s, help="seconds per tool per model")
    parser.add_argument("--threads", type=int, default=Config.threads, help="torch threads per worker (0: default)")
    parser.add_argument("--jobs", type=int, default=Config.jobs, help="workers in parallel")
    parser.add_argument("--out", type=Path, help="CSV to update (default results/coverage.csv)")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        cfg = Config(**json.loads(args.config_json))
        row = run_worker(args.worker, args.models[0], cfg)
        print(RESULT_TAG + json.dumps(row), flush=True)
        return

    cfg = Config(ratio=args.ratio, seed=args.seed, tolerance=args.tolerance, timeout_s=args.timeout,
                 threads=args.threads, jobs=args.jobs)
    models = resolve_models(args.models, "quick" if args.quick else args.list)
    out = args.out or RESULTS / ("coverage_quick.csv" if args.quick else "coverage.csv")
    env = environment(cfg)
    tasks = [(m, t) for m in models for t in args.tools]
    print(f"{len(models)} models x {len(args.tools)} tools, timeout {cfg.timeout_s:.0f} s, "
          f"{cfg.jobs} jobs -> {out}", flush=True)

    def task(item):
        model, tool = item
        row = {**env, **run_isolated(tool, model, cfg)}
        print(f"  {model:<34}{tool:<15}{row['status']:<8}total_s={_fmt(row.get('total_s', '')) or '-':<8}"
              f"exact={row.get('exact', '') or '-'} {_fmt(row.get('exact_rel_diff', ''))} "
              f"{row.get('error', '')[:120]}", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
        rows = list(pool.map(task, tasks))
    finish_report(out, merge_csv(out, rows), summarize, plot)


if __name__ == "__main__":
    main()
