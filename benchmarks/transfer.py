"""Transfer benchmark: test accuracy vs measured FLOPs of the recipes, scorers and Torch-Pruning,
beside a linear probe and a well-trained S->T on the same features.

Three tasks, one pretrained source each, full training splits:

* ``flowers17``: ImageNet EfficientNet-Lite0 -> Flowers-17 (680 train images), 128 px: every
  variant, at 30 % and 50 % FLOPs reduction.
* ``cub100``: ImageNet EfficientNet-Lite0 -> the 100-class CUB-200 subset (2499 train), 128 px:
  the core set.
* ``gtsrb``: CIFAR-10 ResNet-56 (``../shared/data/weights``) -> the GTSRB subset (1290 train),
  32 px, no augmentation (a flip changes a sign's meaning): the core set.

For every (task, seed):

1. **LP**: the linear probe, ``s_to_t`` with ``source.epochs=0`` (L-BFGS logistic regression on
   the frozen pre-logits features, L2 strength chosen on val).
2. **S->T**: ``s_to_t`` with the task's schedule: the probe, then full fine-tuning from it
   (LP-FT). Every ``S->TP->T`` variant starts from a copy of this model.
3. **S->TP->T** variants: graphprune's ``prune_stage_`` at the FLOPs budget (a scorer, with or
   without classifier reuse and class-mean alignment), or Torch-Pruning's ``MetaPruner`` (group
   L1 ``MagnitudeImportance(p=1)``; ``TaylorImportance`` after a backward pass over the same
   target batches the data-driven scorers read) with its channel ratio searched until the
   measured reduction is within 0.5 point of the budget (``_common.tp_prune_to_budget``); then
   the same ``finetune_`` target stage.
4. **SP->T** (compute-optimal view of zero-shot structured pruning): prune the pretrained model
   (``l1``) at 30 / 50 / 70 %, then fine-tune with the *same training budget as S->T*
   (optimizer steps x MACs per image): ``epochs = S->T epochs / (1 - budget)`` (the measured
   reduction lands within half a point of the budget).
5. **TransTailor**: the search from the S->T model (its head re-fitted as a probe, no second
   source fine-tuning), step z, ``tau`` = 2 points on val.

Selection (probe L2, TransTailor's step) reads only val; the test split is evaluated once per
row. Every row: val and test accuracy, MACs and parameters measured by
``graphprune.measurement`` at the task's image size (one fused multiply-add = one MAC), the
training budget (steps, steps x MACs), the environment. Rows are appended as they finish
(under a file lock), so a partial run is usable and jobs can run in parallel processes.

Example:
    python benchmarks/transfer.py --quick                                   # < 10 min, one seed, small
    python benchmarks/transfer.py --jobs flowers17:0 flowers17:1 cub100:0 flowers17:2 --workers 2
    python benchmarks/transfer.py --report benchmarks/results/transfer.csv  # PNG + summary only
"""

from __future__ import annotations

import argparse
import copy
import csv
import fcntl
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphprune.recipes as R  # noqa: E402
from _common import environment_columns, tp_prune_to_budget, write_report  # noqa: E402
from graphprune.assets import CifarResNet, load_cifar_resnet, load_efficientnet_lite0, shared_data_dir  # noqa: E402
from graphprune.measurement import count_macs, count_params, measure_latency  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "task", "recipe", "variant", "toolkit", "scorer", "budget", "seed", "classifier_reuse", "alignment_weight",
    "val_accuracy", "test_accuracy", "macs", "params", "base_macs", "flops_reduction", "train_steps",
    "train_gmacs", "tp_ratio", "prune_s", "seconds", "error", "image_size", "train_images", "test_images",
    "source_epochs", "target_epochs", "threads", "device", "torch", "timm", "torch_pruning", "graphprune",
    "python", "cpu", "date",
    # S->TP->T rows: batch-1 CPU latency of the pruned and the full model, timed interleaved (LATENCY_ROUNDS)
    "latency_ms", "base_latency_ms", "load1",
    # +lat rows: the target (the FLOPs twin's measured reduction), the twin's latency, the prune's own record
    "latency_target", "twin_latency_ms", "latency_predicted", "latency_measured",
]
LATENCY_ROUNDS, LATENCY_REPEATS = 7, 15  # interleaved rounds x timed passes per model and round


@dataclass(frozen=True)
class Variant:
    """One pruned model of a task.

    Attributes:
        recipe: ``"S->TP->T"``, ``"SP->T"`` or ``"TransTailor"``.
        scorer: a graphprune scorer name, or ``"tp_l1"`` / ``"tp_taylor"`` (Torch-Pruning).
        budget: the FLOPs (MACs) reduction asked for (TransTailor: the most its steps can reach).
        reuse: classifier reuse (the full model's classifier, frozen).
        align: weight of the class-mean alignment loss.
        scope: ``"local"`` (the same fraction of every group) or ``"global"`` (one ranking over
            all groups, at most ``GLOBAL_CAP`` of a group removed).
        distill: weight of distillation from the S->T model while the pruned model fine-tunes.
        latency: prune by measured latency instead of MACs (``+lat``): the target is the latency
            reduction that the same recipe's FLOPs-targeted prune at ``budget`` measures (its
            "twin", pruned and timed first), so the two rows compare at the same latency.
    """

    recipe: str
    scorer: str
    budget: float
    reuse: bool = False
    align: float = 0.0
    scope: str = "local"
    distill: float = 0.0
    residual: float = 1.0  # PruneConfig.residual_scale
    steps: int = 1  # PruneConfig.steps: iterative pruning, each step recovered for 1/steps of the epochs
    latency: bool = False

    @property
    def name(self) -> str:
        return (self.scorer + ("+reuse" if self.reuse else "") + ("+align" if self.align else "")
                + ("+global" if self.scope == "global" else "") + ("+kd" if self.distill else "")
                + (f"+res{self.residual:g}" if self.residual != 1 else "") + (f"+it{self.steps}" if self.steps > 1 else "")
                + ("+lat" if self.latency else ""))


def _set(recipe: str, scorers: tuple[str, ...], budgets: tuple[float, ...]) -> tuple[Variant, ...]:
    out = []
    for budget in budgets:
        for s in scorers:
            scorer, *flags = s.split("+")
            residual = next((float(f[3:]) for f in flags if f.startswith("res")), 1.0)
            steps = next((int(f[2:]) for f in flags if f.startswith("it")), 1)
            out.append(Variant(recipe, scorer, budget, reuse="reuse" in flags, align=1.0 if "align" in flags else 0.0,
                               scope="global" if "global" in flags else "local",
                               distill=DISTILL if "kd" in flags else 0.0, residual=residual, steps=steps,
                               latency="lat" in flags))
    return tuple(out)


GLOBAL_CAP = 0.7  # max_group_ratio of a global ranking
DISTILL = 0.7  # FinetuneConfig.distill of the "+kd" variants (temperature: the default, 2)
ALL_SCORERS = ("l1", "random", "target_taylor", "classmean", "classmean+reuse", "classmean+align",
               "classmean+reuse+align", "tp_l1", "tp_taylor",
               # residual streams kept whole (PruneConfig.residual_scale=0): the budget met inside the blocks
               "l1+res0", "target_taylor+res0", "classmean+align+res0", "classmean+reuse+align+res0",
               # and distilled from the unpruned S->T model while it recovers (FinetuneConfig.distill)
               "target_taylor+kd+res0", "classmean+align+kd+res0",
               # iterative: the budget in 3 cuts, each recovered for a third of the epochs (PruneConfig.steps)
               "classmean+reuse+align+res0+it3",
               # by measured latency, at the latency its FLOPs-targeted twin reaches (PruneConfig.latency_reduction)
               "classmean+reuse+align+res0+lat")
# the core set: the two strongest graphprune recipes of the previous Flowers run (with and without the
# residual streams pruned), Torch-Pruning group L1
CORE_SCORERS = ("target_taylor", "classmean+align", "target_taylor+res0", "classmean+align+res0", "tp_l1")
SPT_BUDGETS = (0.3, 0.5, 0.7)
FLOWERS_VARIANTS = (*_set("S->TP->T", ALL_SCORERS, (0.3, 0.5)), *_set("SP->T", ("l1",), SPT_BUDGETS),
                    Variant("TransTailor", "target_taylor", 0.5))
CORE_VARIANTS = (*_set("S->TP->T", CORE_SCORERS, (0.3, 0.5)), *_set("SP->T", ("l1",), SPT_BUDGETS))


@dataclass(frozen=True)
class Task:
    """One source -> target transfer and its schedule.

    Attributes:
        dataset: folder under ``../shared/data``.
        model: ``"lite0"`` (ImageNet EfficientNet-Lite0) or ``"resnet56"`` (CIFAR-10).
        variants: the pruned models of this task.
        image_size: input side in pixels (the JPEG datasets are 144 px, GTSRB 48 px).
        source: the S->T fine-tuning (after the probe).
        target: the fine-tuning after pruning.
        per_class: class-balanced subsets of train / val / test (``None``: the full split).
        augment: timm's training augmentation; off for GTSRB.
        scoring_batches: training batches ``target_taylor`` and TP Taylor read (``classmean``
            reads them all: it needs a sample of every class).
        transtailor_step / transtailor_steps: TransTailor's per-step reduction z and step cap.
    """

    dataset: str
    model: str
    variants: tuple[Variant, ...]
    image_size: int
    source: R.FinetuneConfig
    target: R.FinetuneConfig
    per_class: tuple[int | None, int | None, int | None] = (None, None, None)
    batch_size: int = 32
    augment: bool = True
    scoring_batches: int = 8
    transtailor_step: float = 0.15
    transtailor_steps: int = 4
    transtailor_epochs: float = 2.0


# Schedules chosen on the validation split (benchmarks/README.md): LP-FT from the probe, AdamW
# 5e-4 peak, 10 % warmup, cosine, label smoothing 0.1, timm augmentation (RRC scale 0.08-1),
# BatchNorm statistics frozen in every fine-tuning and shifted by what a removal changed
# (PruneConfig.recalibration="shift"; the recipes' defaults). Flowers-17 seed 0, -30 %, val:
# classmean+align 0.912 shift + frozen, 0.853 shift + trained, 0.871 (mean of 3) reset + trained.
def AFTER_PRUNING(**fields) -> R.FinetuneConfig:  # noqa: N802 - reads like the config it builds
    return R.FinetuneConfig(**{"norm_stats": "frozen", **fields})


FULL = {
    "flowers17": Task("flowers17", "lite0", FLOWERS_VARIANTS, image_size=128,
                      source=R.FinetuneConfig(epochs=8), target=AFTER_PRUNING(epochs=4)),
    "cub100": Task("cub100", "lite0", CORE_VARIANTS, image_size=128,
                   source=R.FinetuneConfig(epochs=6), target=AFTER_PRUNING(epochs=3)),
    "gtsrb": Task("gtsrb_small", "resnet56", CORE_VARIANTS, image_size=32, augment=False, batch_size=64,
                  source=R.FinetuneConfig(epochs=10, lr=2e-3), target=AFTER_PRUNING(epochs=5, lr=1e-3)),
}
QUICK = {
    "flowers17": replace(FULL["flowers17"], image_size=64, per_class=(8, 5, 10), scoring_batches=2,
                         transtailor_steps=2, transtailor_epochs=1.0,
                         source=R.FinetuneConfig(epochs=3), target=AFTER_PRUNING(epochs=2),
                         variants=tuple(v for v in FLOWERS_VARIANTS if v.budget == 0.3 or v.recipe != "S->TP->T"
                                        or v.name in ("l1", "tp_l1"))),
    "cub100": replace(FULL["cub100"], image_size=64, per_class=(3, 2, 3), scoring_batches=2,
                      source=R.FinetuneConfig(epochs=3), target=AFTER_PRUNING(epochs=2),
                      variants=tuple(v for v in CORE_VARIANTS if v.budget == 0.3)),
    "gtsrb": replace(FULL["gtsrb"], per_class=(6, 4, 6), scoring_batches=2,
                     source=R.FinetuneConfig(epochs=4, lr=2e-3), target=AFTER_PRUNING(epochs=2, lr=1e-3),
                     variants=tuple(v for v in CORE_VARIANTS if v.budget == 0.3)),
}


class TimmCifarResNet(CifarResNet):
    """The CIFAR ResNet with the timm contract the recipes use (classifier, features, data config)."""

    def __init__(self, depth: int) -> None:
        super().__init__(blocks_per_stage=(depth - 2) // 6)
        self.num_classes = self.linear.out_features
        # what timm.data.resolve_data_config reads: 32 px, ImageNet statistics (as the weights were trained)
        self.pretrained_cfg = {"classifier": "linear", "input_size": (3, 32, 32), "interpolation": "bilinear",
                               "crop_pct": 1.0, "crop_mode": "center", "mean": (0.485, 0.456, 0.406),
                               "std": (0.229, 0.224, 0.225), "num_classes": self.num_classes}

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        self.linear = nn.Linear(self.linear.in_features, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        return self.layer3(self.layer2(self.layer1(out)))  # (B, 64, 8, 8)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = torch.flatten(self.avgpool(x), 1)  # (B, 64)
        return features if pre_logits else self.linear(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def load_source(kind: str) -> nn.Module:
    if kind == "lite0":
        return load_efficientnet_lite0()
    model = TimmCifarResNet(56)
    model.load_state_dict(load_cifar_resnet(56).state_dict())
    return model.eval()


def tp_pruned(full: nn.Module, data: R.TransferData, variant: Variant, task: Task) -> tuple[nn.Module, dict]:
    """A copy of ``full`` pruned by Torch-Pruning to ``variant.budget``, and ``{"tp_ratio": ...}``."""
    import torch_pruning as tp

    model = copy.deepcopy(full)
    if variant.scorer == "tp_l1":
        importance = tp.importance.MagnitudeImportance(p=1)  # group L1, mean over the group (TP's default)
    else:
        importance = tp.importance.TaylorImportance()
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:  # |w * dL/dw|: gradients of the target loss over the scorers' batches
            for index, (images, targets) in enumerate(data.train):
                if index >= task.scoring_batches:
                    break
                F.cross_entropy(model(images), targets).backward()
        finally:
            for m, training in modes:
                m.training = training
    classifier = [name for name, m in model.named_modules() if m is R.finetune.classifier_of(model)]
    pruned, ratio = tp_prune_to_budget(model, data.example_inputs(), importance, variant.budget, ignored=classifier)
    pruned.zero_grad(set_to_none=True)
    return pruned, {"tp_ratio": round(ratio, 4)}




def _channel_keys(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """One row per channel: its (weight, bias, running mean)."""
    return torch.stack([norm.weight.detach(), norm.bias.detach(), norm.running_mean]).T.cpu()


def kept_by_value(full: nn.Module, pruned: nn.Module) -> dict[str, tuple[int, ...]]:
    """BatchNorm name -> the channels of ``full`` a narrower BatchNorm of ``pruned`` kept, matched by
    their (weight, bias, running mean) in order: Torch-Pruning returns no plan, but it keeps the
    remaining channels in their order and their values untouched."""
    originals = dict(full.named_modules())
    kept = {}
    for name, norm in pruned.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or name not in originals:
            continue
        source = originals[name]
        if norm.num_features == source.num_features:
            continue
        wanted, have, index, j = _channel_keys(norm), _channel_keys(source), [], 0
        for row in wanted:
            while j < len(have) and not torch.equal(have[j], row):
                j += 1
            if j == len(have):
                raise RuntimeError(f"{name}: a kept channel of the Torch-Pruning model is not in the original")
            index.append(j)
            j += 1
        kept[name] = tuple(index)
    return kept


def _row(task_name: str, task: Task, variant: Variant | None, recipe: str, seed: int, model: nn.Module | None,
         data: R.TransferData, test, base_macs: int, started: float, placement: R.Placement, **extra) -> dict:
    row = {"task": task_name, "recipe": recipe, "variant": variant.name if variant else recipe,
           "toolkit": "torch_pruning" if variant and variant.scorer.startswith("tp_") else "graphprune",
           "scorer": variant.scorer if variant else "", "budget": variant.budget if variant else 0.0, "seed": seed,
           "classifier_reuse": variant.reuse if variant else "", "alignment_weight": variant.align if variant else "",
           "base_macs": base_macs, "image_size": task.image_size, "train_images": len(R.device.unwrap(data.train).dataset),
           "test_images": len(test.dataset), "source_epochs": task.source.epochs, "target_epochs": task.target.epochs,
           "threads": torch.get_num_threads(), "device": str(placement.device), **environment_columns()}
    if model is not None:
        macs = int(count_macs(model, data.example_inputs()))
        row.update(val_accuracy=round(R.evaluate(model, data.val, placement=placement), 4),
                   test_accuracy=round(R.evaluate(model, test, placement=placement), 4),
                   macs=macs, params=int(count_params(model)), flops_reduction=round(1 - macs / base_macs, 4))
    row.update(seconds=round(time.perf_counter() - started, 1), **extra)
    return row


def _budget(result: R.RecipeResult, batch_size: int) -> dict:
    """Training budget of a recipe's model: optimizer steps, and forward MACs spent training
    (steps x batch x MACs per image, GMACs) over its stages."""
    steps = sum(s.steps for s in result.stages)
    gmacs = sum(s.steps * batch_size * s.macs for s in result.stages) / 1e9
    return {"train_steps": steps, "train_gmacs": round(gmacs, 1)}


def run_variant(task_name: str, task: Task, variant: Variant, seed: int, source: nn.Module, full: nn.Module,
                data: R.TransferData, test, base_macs: int, full_budget: dict, means: dict,
                placement: R.Placement) -> dict:
    started = time.perf_counter()
    run = R.RunConfig(seed=seed, progress=False)
    if variant.recipe == "SP->T":  # the same training budget (steps x MACs) as S->T
        epochs = task.source.epochs / (1 - variant.budget)
        prune = R.PruneConfig(scorer=variant.scorer, flops_reduction=variant.budget, residual_scale=variant.residual)
        target = replace(task.source, epochs=epochs, norm_stats=task.target.norm_stats)  # after pruning
        model, result = R.sp_t(source, data, R.TransferConfig(prune=prune, target=target, run=run))
        return _row(task_name, task, variant, "SP->T", seed, model, data, test, base_macs, started, placement,
                    prune_s=round(result.stage("prune").seconds, 1), **_budget(result, task.batch_size))
    if variant.recipe == "TransTailor":
        config = R.TransTailorConfig(source=R.FinetuneConfig(epochs=0), step_flops_reduction=task.transtailor_step,
                                     max_steps=task.transtailor_steps, tau=0.02, scoring_batches=task.scoring_batches,
                                     finetune=replace(task.target, epochs=task.transtailor_epochs), run=run)
        model, result = R.transtailor(full, data, config)
        steps = "; ".join(f"{s.name} val {s.val_accuracy:.3f} at -{1 - s.macs / result.base_macs:.0%}"
                          for s in result.stages)
        print(f"  TransTailor stages: {steps}; selected {result.final.name}", flush=True)
        spent = _budget(result, task.batch_size)
        return _row(task_name, task, variant, "TransTailor", seed, model, data, test, base_macs, started, placement,
                    error=f"selected {result.final.name}", train_steps=full_budget["train_steps"] + spent["train_steps"],
                    train_gmacs=round(full_budget["train_gmacs"] + spent["train_gmacs"], 1))
    prune_start = time.perf_counter()
    extra: dict = {}
    if variant.scorer.startswith("tp_"):
        model, extra = tp_pruned(full, data, variant, task)
        placement.model_(model)
        # the same recipe as graphprune's prune stage: BatchNorm statistics shifted by what the removal changed
        R.norms.shift_norms_(model, full, R.stages.mixed_batches(data.unaugmented_train),
                             kept=kept_by_value(full, model), max_batches=R.PruneConfig().recalibrate_batches,
                             placement=placement)
    else:
        model = copy.deepcopy(full)
        prune = R.PruneConfig(scorer=variant.scorer, flops_reduction=variant.budget, classifier_reuse=variant.reuse,
                              alignment_weight=variant.align, scope=variant.scope, residual_scale=variant.residual,
                              max_group_ratio=GLOBAL_CAP if variant.scope == "global" else None,
                              # a class mean needs every class: classmean reads the whole training set
                              scoring_batches=None if variant.scorer == "classmean" else task.scoring_batches,
                              steps=variant.steps)
    twin = None
    if variant.latency:  # the FLOPs-targeted twin first: its measured latency reduction is this row's target
        twin = copy.deepcopy(full)
        R.prune_stage_(twin, data, prune, seed=seed, progress=False, placement=placement)
        times = interleaved_ms({"full": full, "twin": twin}, data.example_inputs())
        extra["latency_target"] = round(1 - times["twin"] / times["full"], 4)
        prune = replace(prune, flops_reduction=None, latency_reduction=extra["latency_target"])
        prune_start = time.perf_counter()
    target = replace(task.target, distill=variant.distill, epochs=task.target.epochs / variant.steps)
    steps, gmacs = full_budget["train_steps"], full_budget["train_gmacs"]
    for step in range(variant.steps):  # one cut, or PruneConfig.steps cuts each recovered for 1/steps of the epochs
        if not variant.scorer.startswith("tp_"):
            stage = prune if variant.steps == 1 else replace(prune, flops_reduction=prune.step_reductions()[step],
                                                             steps=1)
            pruned = R.prune_stage_(model, data, stage, seed=seed, progress=False, placement=placement)
            record = pruned.details.get("latency") or {}
            extra.update(latency_predicted=record.get("predicted"), latency_measured=record.get("measured"))
        extra["prune_s"] = extra.get("prune_s", 0.0) + round(time.perf_counter() - prune_start, 1)
        if variant.align and "means" not in means:  # after the first cut, as in one-shot rows (the loaders' order)
            means["means"] = R.stages.full_model_class_means(full, data, progress=False)
        record = R.finetune_(model, data, target, name="target", freeze_classifier=variant.reuse,
                             class_means=means.get("means") if variant.align else None,
                             alignment_weight=variant.align, seed=seed, progress=False, placement=placement,
                             teacher=full if variant.distill else None)
        steps, gmacs = steps + record.steps, gmacs + record.steps * task.batch_size * record.macs / 1e9
        prune_start = time.perf_counter()
    budget = {"train_steps": steps, "train_gmacs": round(gmacs, 1)}
    times = interleaved_ms({"full": full, "model": model, **({"twin": twin} if twin is not None else {})},
                           data.example_inputs())
    extra.update(latency_ms=round(times["model"], 3), base_latency_ms=round(times["full"], 3),
                 twin_latency_ms=round(times["twin"], 3) if twin is not None else None, load1=round(os.getloadavg()[0], 2))
    return _row(task_name, task, variant, "S->TP->T", seed, model, data, test, base_macs, started, placement,
                **{k: v for k, v in extra.items() if v is not None}, **budget)


def interleaved_ms(models: dict[str, nn.Module], example) -> dict[str, float]:
    """Median batch-1 latency (ms, this process's threads) of each model, timed in ``LATENCY_ROUNDS``
    interleaved rounds (the order rotated each round) so that a load change moves them all alike."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for number in range(LATENCY_ROUNDS):
        for name in names[number % len(names):] + names[:number % len(names)]:
            stats = measure_latency(models[name], example, warmup=2, repeats=LATENCY_REPEATS)
            samples[name].extend(stats.samples_ms)
    return {name: statistics.median(values) for name, values in samples.items()}


def append_row(path: Path, row: dict) -> None:
    """Append one row under an exclusive lock (header first if the file is new): parallel jobs share one CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="raise")
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in FIELDS})
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finished(out: Path, task_name: str, seed: int) -> set[tuple[str, str, float]]:
    """(recipe, variant, budget) of the rows of (task, seed) already in ``out`` without an error
    (TransTailor rows carry their selection in ``error``): a rerun of the job skips them."""
    if not out.exists():
        return set()
    return {(r["recipe"], r["variant"], float(r["budget"])) for r in read_rows(out)
            if r["task"] == task_name and int(r["seed"]) == seed
            and (not r["error"] or r["recipe"] in ("LP", "TransTailor")) and r["test_accuracy"]}


def run_job(task_name: str, task: Task, seed: int, out: Path) -> None:
    """LP, S->T and every variant of one (task, seed), rows appended to ``out`` as they finish;
    rows already in ``out`` are not run again (the same seed retrains the same S->T model)."""
    done = finished(out, task_name, seed)
    todo = [v for v in task.variants if (v.recipe, v.name, v.budget) not in done]
    root = shared_data_dir() / task.dataset
    source = load_source(task.model)
    train_pc, val_pc, test_pc = task.per_class
    raw = R.image_folder_data(root, source, image_size=task.image_size, batch_size=task.batch_size,
                              per_class=train_pc, val_per_class=val_pc, augment=task.augment, seed=seed)
    test_raw = R.eval_loader(root, "test", source, image_size=task.image_size, per_class=test_pc)
    placement = R.Placement.resolve(source, "auto")
    data, test = R.on_device(raw, placement), R.DeviceLoader(test_raw, placement)
    quiet = R.RunConfig(seed=seed, progress=False)

    started = time.perf_counter()
    probe, result = R.s_to_t(source, raw, R.TransferConfig(source=R.FinetuneConfig(epochs=0), run=quiet))
    base_macs = result.final.macs
    if ("LP", "LP", 0.0) not in done:
        row = _row(task_name, task, None, "LP", seed, probe, data, test, base_macs, started, placement,
                   train_steps=0, train_gmacs=0.0, error=f"l2 {result.stage('probe').details['l2']}")
        append_row(out, row)
        print(f"{task_name} seed {seed} LP: val {row['val_accuracy']} test {row['test_accuracy']} "
              f"({row['seconds']} s)", flush=True)
    if ("S->T", "S->T", 0.0) in done and not todo:
        return
    started = time.perf_counter()
    full, result = R.s_to_t(source, raw, R.TransferConfig(source=task.source, run=quiet))
    full_budget = _budget(result, task.batch_size)
    if ("S->T", "S->T", 0.0) not in done:
        row = _row(task_name, task, None, "S->T", seed, full, data, test, base_macs, started, placement,
                   **full_budget)
        append_row(out, row)
        print(f"{task_name} seed {seed} S->T: val {row['val_accuracy']} test {row['test_accuracy']} "
              f"({row['seconds']} s)", flush=True)
    means: dict = {}
    for variant in todo:
        try:
            row = run_variant(task_name, task, variant, seed, source, full, data, test, base_macs, full_budget,
                              means, placement)
        except Exception as error:  # one failing variant (e.g. a toolkit that cannot trace the model) is a row
            traceback.print_exc()
            row = _row(task_name, task, variant, variant.recipe, seed, None, data, test, base_macs,
                       time.perf_counter(), placement, error=f"{type(error).__name__}: {error}"[:300])
        append_row(out, row)
        print(f"{task_name} seed {seed} {variant.recipe} {variant.name} -{variant.budget:.0%}: "
              f"val {row.get('val_accuracy', '-')} test {row.get('test_accuracy', '-')} "
              f"reduction {row.get('flops_reduction', '-')} ({row['seconds']} s) {row.get('error', '')}",
              flush=True)


def run_jobs(jobs: list[tuple[str, int]], workers: int, quick: bool, threads: int, out: Path,
             budgets: list[float] | None = None, variants: list[str] | None = None,
             schedule: list[str] | None = None) -> None:
    """Run jobs in ``workers`` parallel processes of ``threads`` torch threads each (a simple queue).

    ``schedule``: the ``--source-epochs`` / ``--target-epochs`` arguments, passed on to every job."""
    pending = list(jobs)
    running: list[subprocess.Popen] = []
    logs = out.with_suffix(".log")
    with open(logs, "a") as log:
        while pending or running:
            while pending and len(running) < workers:
                task, seed = pending.pop(0)
                argv = [sys.executable, __file__, "--jobs", f"{task}:{seed}", "--workers", "1", "--threads",
                        str(threads), "--out", str(out), "--no-report"] + (["--quick"] if quick else [])
                argv += ["--budgets", *map(str, budgets)] if budgets else []
                argv += ["--variants", *variants] if variants else []
                argv += schedule or []
                running.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(2)
            running = [p for p in running if p.poll() is None]


# --------------------------------------------------------------------------- report


TASK_ORDER = ("flowers17", "cub100", "gtsrb")


def _task_rank(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (task, recipe, variant, budget), in first-seen order; failed rows counted apart."""
    keys = list(dict.fromkeys((r["task"], r["recipe"], r["variant"], r["budget"]) for r in rows))
    keys.sort(key=lambda key: _task_rank(key[0]))  # stable: run order within a task
    out = []
    for key in keys:
        mine = [r for r in rows if (r["task"], r["recipe"], r["variant"], r["budget"]) == key]
        ok = [r for r in mine if r["test_accuracy"] not in ("", None)]
        entry = {"task": key[0], "recipe": key[1], "variant": key[2], "budget": float(key[3]), "seeds": len(ok),
                 "failed": len(mine) - len(ok), "error": next((r["error"] for r in mine if not r["test_accuracy"]),
                                                               ""),
                 "toolkit": mine[0]["toolkit"], "seed_list": sorted({r["seed"] for r in ok})}
        if ok:
            for name in ("test_accuracy", "val_accuracy", "flops_reduction", "macs", "params", "train_gmacs"):
                values = [float(r[name]) for r in ok if r.get(name) not in ("", None)]
                if values:
                    entry[name] = statistics.mean(values)
                    entry[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def _find(entries: list[dict], recipe: str, variant: str | None = None, budget: float | None = None) -> dict | None:
    for e in entries:
        if e["recipe"] == recipe and (variant is None or e["variant"] == variant) \
                and (budget is None or abs(e["budget"] - budget) < 1e-9) and e["seeds"]:
            return e
    return None


def targets_text(entries: list[dict]) -> list[str]:
    """The issue's targets, computed from the aggregated rows (means over seeds)."""
    lines = []
    lp, st = _find(entries, "LP"), _find(entries, "S->T")
    if lp and st:
        gap = 100 * (st["test_accuracy"] - lp["test_accuracy"])
        lines.append(f"  target S->T >= LP + 3 points: S->T {st['test_accuracy']:.3f} vs LP {lp['test_accuracy']:.3f} "
                     f"({gap:+.1f} points): {'met' if gap >= 3 else 'MISSED'}")
    for budget, rule in ((0.3, "within 1 point of S->T"), (0.5, ">= 2 points above Torch-Pruning group L1")):
        ours = [e for e in entries if e["recipe"] == "S->TP->T" and e["toolkit"] == "graphprune"
                and abs(e["budget"] - budget) < 1e-9 and e["seeds"]]
        if not ours:
            continue
        best = max(ours, key=lambda e: e["val_accuracy"])  # chosen on val, read on test
        if budget == 0.3 and st:
            gap = 100 * (best["test_accuracy"] - st["test_accuracy"])
            lines.append(f"  target at -30% best graphprune recipe (by val: {best['variant']}) {rule}: "
                         f"{best['test_accuracy']:.3f} vs S->T {st['test_accuracy']:.3f} ({gap:+.1f} points): "
                         f"{'met' if gap >= -1 else 'MISSED'}")
        tp = _find(entries, "S->TP->T", "tp_l1", budget)
        if budget == 0.5 and tp:
            gap = 100 * (best["test_accuracy"] - tp["test_accuracy"])
            lines.append(f"  target at -50% best graphprune recipe (by val: {best['variant']}) {rule}: "
                         f"{best['test_accuracy']:.3f} vs tp_l1 {tp['test_accuracy']:.3f} ({gap:+.1f} points): "
                         f"{'met' if gap >= 2 else 'MISSED'}")
    return lines


def summary_text(rows: list[dict]) -> str:
    lines = []
    env = rows[0]
    lines.append(f"transfer benchmark: torch {env['torch']}, timm {env['timm']}, torch_pruning "
                 f"{env['torch_pruning']}, {env['cpu']}, {env['threads']} thread(s) per job, device {env['device']}")
    lines.append("test accuracy mean ± std over seeds (n), measured FLOPs (MACs) reduction, MACs, params, "
                 "training budget (forward GMACs spent training = steps x batch x MACs per image, all stages)")
    for task in sorted(dict.fromkeys(r["task"] for r in rows), key=_task_rank):
        first = next(r for r in rows if r["task"] == task)
        lines.append(f"\n{task}: {first['image_size']} px, {first['train_images']} train images, "
                     f"{first['test_images']} test images, epochs S->T {first['source_epochs']} / after pruning "
                     f"{first['target_epochs']}")
        entries = aggregate([r for r in rows if r["task"] == task])
        for e in entries:
            label = f"{e['recipe']:<12} {e['variant']:<22} " + (f"-{e['budget']:.0%}" if e["budget"] else "ref ")
            if e["seeds"]:
                lines.append(f"  {label}  test {e['test_accuracy']:.3f} ± {e['test_accuracy_std']:.3f} "
                             f"(n={e['seeds']})  val {e['val_accuracy']:.3f}  reduction {e['flops_reduction']:.3f}"
                             f"  MACs {e['macs'] / 1e6:.1f}M  params {e['params'] / 1e6:.3f}M"
                             f"  budget {e.get('train_gmacs', 0):.0f} GMACs"
                             + (f"  failed {e['failed']}" if e["failed"] else ""))
            else:
                lines.append(f"  {label}  FAILED ({e['failed']} seeds): {e['error'][:120]}")
        lines += targets_text(entries)
    return "\n".join(lines) + "\n"


STYLE = {"graphprune": "o", "torch_pruning": "s"}
COLORS = {"l1": "#1f77b4", "random": "#7f7f7f", "target_taylor": "#2ca02c", "classmean": "#9467bd",
          "classmean+reuse": "#c5b0d5", "classmean+align": "#d62728", "classmean+reuse+align": "#ff9896",
          "tp_l1": "#17becf", "tp_taylor": "#bcbd22"}


def plot(rows: list[dict], path: Path) -> None:
    """Per task, two panels: test accuracy vs measured reduction (LP and S->T as lines); and the
    compute-optimal view, SP->T at a fixed training budget against S->T (0 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(dict.fromkeys(r["task"] for r in rows), key=_task_rank)
    names = list(dict.fromkeys(f"{r['recipe']} {r['variant']}" for r in rows if r["recipe"] == "S->TP->T"))
    offset = {n: (i - (len(names) - 1) / 2) * 4.0 / max(len(names), 1) for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 11), squeeze=False)
    for column, task in enumerate(tasks):
        entries = [e for e in aggregate([r for r in rows if r["task"] == task]) if e["seeds"]]
        ax, compute = axes[0][column], axes[1][column]
        seen = set()
        for e in entries:
            if e["recipe"] in ("LP", "S->T"):
                style = {"LP": ("#555", "--"), "S->T": ("black", ":")}[e["recipe"]]
                for target in (ax, compute):
                    target.axhline(e["test_accuracy"], color=style[0], lw=1, ls=style[1],
                                   label=f"{e['recipe']} (no pruning)" if e["recipe"] == "S->T" else "linear probe")
                    target.axhspan(e["test_accuracy"] - e["test_accuracy_std"],
                                   e["test_accuracy"] + e["test_accuracy_std"], color=style[0], alpha=0.06)
                continue
            label = f"{e['recipe']} {e['variant']}"
            if e["recipe"] == "SP->T":
                compute.errorbar(100 * e["flops_reduction"], e["test_accuracy"], yerr=e["test_accuracy_std"], fmt="v",
                                 capsize=3, color="#8c564b", label=None if "spt" in seen else "SP->T l1, same budget")
                seen.add("spt")
                continue
            flags = e["variant"].split("+")
            base = "+".join(f for f in flags if f != "kd" and not f.startswith("res"))
            # a variant's colour is its scorer's; residual streams kept (+res0): hollow; distilled (+kd): diamond
            marker = "*" if e["recipe"] == "TransTailor" else "D" if "kd" in flags else STYLE[e["toolkit"]]
            color = "#e377c2" if e["recipe"] == "TransTailor" else COLORS.get(base, "#e377c2")
            hollow = any(f.startswith("res") for f in flags)
            ax.errorbar(100 * e["flops_reduction"] + offset.get(label, 0.0), e["test_accuracy"],
                        yerr=e["test_accuracy_std"], fmt=marker, capsize=3, color=color,
                        markerfacecolor="white" if hollow else color, markeredgewidth=1.5,
                        markersize=11 if e["recipe"] == "TransTailor" else 6,
                        label=None if label in seen else label.replace("S->TP->T ", ""), alpha=0.9)
            seen.add(label)
        st = _find(entries, "S->T")
        if st:
            compute.plot([0], [st["test_accuracy"]], "D", color="black", label="S->T (0 %)")
        seeds = sorted({r["seed"] for r in rows if r["task"] == task})
        ax.set_title(f"{task}: S->TP->T and TransTailor (seeds {', '.join(seeds)})", fontsize=10)
        compute.set_title(f"{task}: SP->T at the S->T training budget (MACs spent training)", fontsize=10)
        compute.set_xlim(-3, 75)
        for target in (ax, compute):
            target.set_xlabel("measured FLOPs (MACs) reduction, %")
            target.set_ylabel("test accuracy (mean ± std over seeds)")
            target.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
        compute.legend(fontsize=8, loc="lower left")
    fig.suptitle("Transfer: test accuracy vs measured FLOPs reduction.\nCircles: graphprune (hollow: residual "
                 "streams kept, +res0; diamonds: +kd); squares: Torch-Pruning; star: TransTailor; triangles: SP->T",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DOCS_FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "transfer.png"


def tables_markdown(rows: list[dict]) -> str:
    """One markdown table per task (mean ± std over seeds) and its targets: the README's block."""
    parts = []
    for task in sorted(dict.fromkeys(r["task"] for r in rows), key=_task_rank):
        entries = aggregate([r for r in rows if r["task"] == task])
        lines = [f"`{task}`:", "", "| recipe | variant | budget | test accuracy | n | val accuracy | measured reduction "
                 "| MACs | params | training GMACs |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in entries:
            budget = f"{e['budget']:.0%}" if e["budget"] else "–"
            if not e["seeds"]:
                lines.append(f"| {e['recipe']} | {e['variant']} | {budget} | failed: {e['error'][:80]} | 0 "
                             "| | | | | |")
                continue
            lines.append(f"| {e['recipe']} | {e['variant']} | {budget} | {e['test_accuracy']:.3f} ± "
                         f"{e['test_accuracy_std']:.3f} | {e['seeds']} | {e['val_accuracy']:.3f} | "
                         f"{e['flops_reduction']:.3f} | {e['macs'] / 1e6:.1f} M | {e['params'] / 1e6:.3f} M | "
                         f"{e.get('train_gmacs', 0):.0f} |")
        lines += ["", *("* " + t.strip() for t in targets_text(entries))]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


README_BLOCK = ("<!-- transfer-tables:begin (benchmarks/transfer.py --report writes this block) -->",
                "<!-- transfer-tables:end -->")


def update_readme(rows: list[dict], readme: Path = Path(__file__).resolve().parent / "README.md") -> None:
    """Replace the block between the README's markers with :func:`tables_markdown` (no hand-copied figure)."""
    text = readme.read_text()
    begin, end = README_BLOCK
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        readme.write_text(head + begin + "\n\n" + tables_markdown(rows) + "\n" + end + rest.split(end, 1)[1])


def compare_markdown(paths: list[Path], task: str = "flowers17", variants: list[str] | None = None,
                     budgets: list[float] | None = None) -> str:
    """One markdown table over several runs' CSVs (a schedule study): per CSV and variant, the schedule
    its rows record (S->T and after-pruning epochs), test mean ± std over seeds, val mean, the seeds.
    ``variants`` / ``budgets`` keep only those pruned rows (LP and S->T always stay)."""
    lines = ["| CSV | S->T epochs | epochs after pruning | recipe | variant | budget | test accuracy | val accuracy "
             "| seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rows = [r for r in read_rows(path) if r["task"] == task]
        for e in aggregate(rows):
            pruned = e["recipe"] not in ("LP", "S->T")
            if not e["seeds"] or pruned and ((variants and e["variant"] not in variants)
                                             or (budgets and e["budget"] not in budgets)):
                continue
            first = next(r for r in rows if (r["recipe"], r["variant"]) == (e["recipe"], e["variant"])
                         and float(r["budget"]) == e["budget"])
            target = f"{float(first['target_epochs']):g}" if pruned else "–"
            budget = f"{e['budget']:.0%}" if e["budget"] else "–"
            lines.append(f"| `{path.name}` | {float(first['source_epochs']):g} | {target} | {e['recipe']} | "
                         f"{e['variant']} | {budget} | {e['test_accuracy']:.3f} ± {e['test_accuracy_std']:.3f} | "
                         f"{e['val_accuracy']:.3f} | {','.join(e['seed_list'])} |")
    return "\n".join(lines) + "\n"


def report(out: Path) -> None:
    rows = read_rows(out)
    if write_report(out, rows, committed=RESULTS / "transfer.csv", docs_figure=DOCS_FIGURE, plot=plot,
                    summary_text=summary_text):
        update_readme(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets and short schedules (< 10 min)")
    parser.add_argument("--jobs", nargs="+", default=None, metavar="TASK:SEED",
                        help="(task, seed) jobs in queue order (default: every task, seeds 0 1 2; quick: seed 0)")
    parser.add_argument("--workers", type=int, default=1, help="parallel job processes (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job process (default 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path, appended to (the PNG, summary and log go next to it)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, metavar="R",
                        help="only the pruned variants at these FLOPs reductions (LP and S->T always run)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="only the pruned variants of these names, e.g. classmean+align+res0 (LP and S->T always run)")
    parser.add_argument("--source-epochs", type=float, default=None, metavar="E",
                        help="override every task's S->T epochs (a schedule study; write it to its own --out)")
    parser.add_argument("--target-epochs", type=float, default=None, metavar="E",
                        help="override every task's epochs after pruning (a schedule study; its own --out)")
    parser.add_argument("--report", type=Path, default=None, help="only redraw the PNG and summary of this CSV")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="CSV",
                        help="only print one markdown table over these runs' CSVs (Flowers-17 rows)")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # job processes of a queue
    args = parser.parse_args(argv)
    if args.report:
        report(args.report)
        return
    if args.compare:
        print(compare_markdown(args.compare, variants=args.variants, budgets=args.budgets), end="")
        return
    torch.set_num_threads(args.threads)
    tasks = QUICK if args.quick else FULL
    if args.budgets or args.variants:
        tasks = {name: replace(task, variants=tuple(
            v for v in task.variants if (not args.budgets or v.budget in args.budgets)
            and (not args.variants or v.name in args.variants))) for name, task in tasks.items()}
    schedule = []
    for flag, value, stage in (("--source-epochs", args.source_epochs, "source"),
                               ("--target-epochs", args.target_epochs, "target")):
        if value is not None:
            if value <= 0:
                parser.error(f"{flag} must be > 0, got {value}")
            schedule += [flag, str(value)]
            tasks = {name: replace(task, **{stage: replace(getattr(task, stage), epochs=value)})
                     for name, task in tasks.items()}
    if args.jobs:
        jobs = []
        for text in args.jobs:
            name, _, seed = text.partition(":")
            if name not in tasks or not seed.isdigit():
                parser.error(f"a job is TASK:SEED with TASK in {sorted(tasks)}, got {text!r}")
            jobs.append((name, int(seed)))
    else:
        jobs = [(name, seed) for seed in ([0] if args.quick else [0, 1, 2]) for name in sorted(tasks)]
    out = args.out or RESULTS / ("transfer_quick.csv" if args.quick else "transfer.csv")
    if out.exists():  # appending lets parallel processes share one CSV; a stale file would mix runs
        print(f"appending to {out} ({len(read_rows(out))} rows already; finished rows of a job are skipped); "
              "delete it for a fresh run", flush=True)
    if args.workers > 1:
        run_jobs(jobs, args.workers, args.quick, args.threads, out, args.budgets, args.variants, schedule)
    else:
        for name, seed in jobs:
            run_job(name, tasks[name], seed, out)
    if not args.no_report:
        report(out)


if __name__ == "__main__":
    main()
