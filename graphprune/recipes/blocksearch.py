"""Depth search (NetTailor-style): how many residual blocks can the target task do without?

From the fine-tuned full model (the teacher, S->T):

1. find its removable blocks in the traced graph (:func:`graphprune.blocks.find_blocks`);
2. score them: learned gates trained on target data with the weights frozen, under cross
   entropy + a complexity penalty + a teacher term (:func:`graphprune.blocks.train_gates`),
   or the data-free ``end_scale`` / the ``random`` baseline;
3. for k = step, 2 step, ...: remove the k lowest-scoring blocks from the teacher (identity,
   or the trained proxies), fine-tune, and measure validation accuracy; a step *passes* when
   it is within ``tolerance`` of the teacher; with ``patience`` the walk stops after that many
   failed steps in a row (validation accuracy on a small split is noisy, so one failure is
   weak evidence; ``None`` walks every k);
4. keep the smallest model that passed (the teacher itself when none did), then optionally
   prune channels of what is left and fine-tune again (depth, then width).

Every decision reads the validation split only. Easy targets should lose more blocks than
hard ones at the same tolerance; ``benchmarks/blocks.py`` measures whether they do.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..blocks import Blocks, GateConfig, apply_block_plan_, block_scores, find_blocks, make_block_plan, train_gates
from ..blocks.modules import Proxy
from ..blocks.plan import REPLACEMENTS
from ..blocks.scoring import BLOCK_SCORERS
from ..errors import InvalidArgumentError
from .config import HEAD_INITS, FinetuneConfig, PruneConfig, RunConfig, json_ready
from .data import TransferData
from .distributed import on_main, sync_state_
from .finetune import finetune_
from .stages import recalibrate_after_removal_
from .run import RecipeRun
from .records import RecipeResult, StageRecord
from .stages import prune_stage_


@dataclass(frozen=True)
class BlockSearchConfig:
    """The depth search.

    Attributes:
        source: fine-tuning of the full model, which becomes the teacher.
        scorer: ``"gate"`` (learned, the NetTailor way), ``"end_scale"`` (data-free) or ``"random"``.
        gates: gate training settings (``scorer="gate"``); ``gates.proxies`` trains proxies too.
        replacement: ``"identity"`` (removed branches add zero) or ``"proxy"`` (the trained
            proxies stand in; needs ``gates.proxies`` and lets downsampling blocks go too).
        tolerance: largest allowed drop of validation accuracy below the teacher (a fraction).
        patience: stop after this many failed steps in a row (``None``: try every k).
        step: blocks added per search step.
        max_blocks: stop after removing this many (``None``: every candidate).
        finetune: fine-tuning after each removal.
        width: optional channel pruning of the selected model (depth, then width).
        width_finetune: fine-tuning after the channel pruning.
        run: checkpoints, seed, progress, device.
        head_init: ``"probe"`` (a linear probe before the teacher's fine-tuning, as in
            :class:`~graphprune.recipes.TransferConfig`) or ``"random"``.
        recalibrate_batches: BatchNorm statistics re-estimated on target data after each block
            removal, as :attr:`~graphprune.recipes.PruneConfig.recalibrate_batches`; off by
            default: removing a residual branch shifts the statistics downstream much less
            than cutting channels, and re-estimating every BatchNorm on the target moves the
            features away from the ones the teacher's head was fitted on (hymenoptera, 3
            blocks, 1 epoch: val 0.900 kept vs 0.667 re-estimated).
    """

    source: FinetuneConfig = field(default_factory=FinetuneConfig)
    scorer: str = "gate"
    gates: GateConfig = field(default_factory=GateConfig)
    replacement: str = "identity"
    tolerance: float = 0.02
    patience: int | None = None
    step: int = 1
    max_blocks: int | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    width: PruneConfig | None = None
    width_finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    head_init: str = "probe"
    recalibrate_batches: int | None = 0

    def __post_init__(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise InvalidArgumentError(f"BlockSearchConfig.head_init must be one of {HEAD_INITS}, "
                                       f"got {self.head_init!r}")
        if self.scorer not in BLOCK_SCORERS:
            raise InvalidArgumentError(f"BlockSearchConfig.scorer must be one of {sorted(BLOCK_SCORERS)}, "
                                       f"got {self.scorer!r}")
        if self.replacement not in REPLACEMENTS:
            raise InvalidArgumentError(f"BlockSearchConfig.replacement must be one of {REPLACEMENTS}, "
                                       f"got {self.replacement!r}")
        if self.replacement == "proxy" and not (self.scorer == "gate" and self.gates.proxies):
            raise InvalidArgumentError("replacement='proxy' needs trained proxies: scorer='gate' and "
                                       "gates=GateConfig(proxies=True)")
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1:
            raise InvalidArgumentError(f"BlockSearchConfig.tolerance must be a fraction in [0, 1], got {t!r}")
        for name in ("step", "max_blocks", "patience"):
            value = getattr(self, name)
            if value is None and name != "step":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"BlockSearchConfig.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Example:
            >>> BlockSearchConfig(tolerance=0.05).to_dict()["tolerance"]
            0.05
        """
        return json_ready(asdict(self))


def _scores_on_main(teacher: nn.Module, blocks: Blocks, data: TransferData, config: BlockSearchConfig,
                    progress: bool) -> tuple[dict[str, float], dict[str, dict[str, torch.Tensor]]]:
    """Block scores, and the trained proxies' state dicts (picklable, for every rank)."""
    torch.manual_seed(config.run.seed)
    if config.scorer != "gate":
        return block_scores(blocks, teacher, config.scorer, seed=config.run.seed), {}
    candidates = blocks.candidates(config.replacement)
    result = train_gates(blocks, teacher, data.train, teacher=teacher, config=config.gates, candidates=candidates,
                         progress=progress)
    return result.scores, {name: proxy.state_dict() for name, proxy in result.proxies.items()}


def block_search(model: nn.Module, data: TransferData, config: BlockSearchConfig | None = None
                 ) -> tuple[nn.Module, RecipeResult]:
    """Remove as many residual blocks as the target task allows, then (optionally) channels.

    Args:
        model: the source (pretrained) timm model; not modified.
        data: the target task; ``val`` drives every decision.
        config: the search settings; ``None``: the defaults.

    Returns:
        The selected model and the metrics record: stage ``source`` (the teacher), then
        ``depth-<k>`` per search step (``details``: removed blocks, scores, FLOPs reduction),
        then ``width`` and ``width-finetune`` when ``config.width`` is set.
        ``config["selected_stage"]`` names the stage of the returned model (the depth step kept,
        or ``width-finetune``), so ``result.final`` describes it.

    Example:
        >>> import timm, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> pairs = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> data = TransferData(DataLoader(pairs, batch_size=4), DataLoader(pairs, batch_size=4), ("a", "b"))
        >>> config = BlockSearchConfig(source=FinetuneConfig(epochs=0), scorer="end_scale", tolerance=1.0,
        ...                            max_blocks=2, finetune=FinetuneConfig(epochs=0.5), run=RunConfig(progress=False))
        >>> small, result = block_search(timm.create_model("resnet18", pretrained=False), data, config)
        >>> [s.name for s in result.stages], result.final.details["blocks_removed"]
        (['probe', 'source', 'depth-1', 'depth-2'], 2)
    """
    config = config or BlockSearchConfig()
    run = RecipeRun("BlockSearch", model, data, config)  # type: ignore[arg-type]
    run.probe()
    run.stage("source", run.finetune("source", config.source))
    teacher = run.model
    teacher_accuracy = run.store.record("source").val_accuracy
    example = run.data.example_inputs()
    blocks = find_blocks(teacher, example)
    scores, proxy_states = on_main(run.ctx, lambda: _scores_on_main(teacher, blocks, run.data, config, run.progress))
    ranked = sorted(blocks.candidates(config.replacement), key=lambda b: (scores[b.name], b.order))
    limit = min(len(ranked), config.max_blocks or len(ranked))
    selected: tuple[str, nn.Module] = ("source", teacher)
    failures = 0
    for k in range(config.step, limit + 1, config.step):
        name = f"depth-{k}"
        if run.store.done(name):
            candidate, record = run.load(name), run.store.record(name)
        else:
            candidate, record = _depth_step(run, teacher, blocks, [b.name for b in ranked[:k]], scores, proxy_states,
                                            name, config)
        if record.val_accuracy >= teacher_accuracy - config.tolerance:
            selected, failures = (name, candidate), 0
            continue
        failures += 1
        if config.patience is not None and failures >= config.patience:
            break
    run.store.select(selected[0])
    run.model = selected[1]
    if config.width is not None:
        run.stage("width", lambda m: prune_stage_(m, run.data, config.width, name="width", ctx=run.ctx,
                                                  seed=config.run.seed, progress=run.progress,
                                                  placement=run.placement))
        run.stage("width-finetune", run.finetune("width-finetune", config.width_finetune))
        run.store.select("width-finetune")  # the returned model is the width-pruned one
    return run.model, run.store.result()


def _depth_step(run: RecipeRun, teacher: nn.Module, blocks: Blocks, names: list[str], scores: dict[str, float],
                proxy_states: dict[str, dict[str, torch.Tensor]], name: str, config: BlockSearchConfig
                ) -> tuple[nn.Module, StageRecord]:
    start = time.perf_counter()
    candidate = copy.deepcopy(teacher)
    plan = make_block_plan(blocks, names, replacement=config.replacement)
    proxies = {}
    for edit in plan.edits:
        if edit.replacement == "proxy":
            proxy = Proxy(*edit.proxy)
            proxy.load_state_dict(proxy_states[edit.block])
            proxies[edit.block] = proxy
    apply_block_plan_(candidate, plan, proxies=proxies)
    run.placement.model_(candidate)  # proxies are built on the CPU
    recalibrate_after_removal_(candidate, run.data, config.recalibrate_batches, run.placement)
    sync_state_(candidate, run.ctx)
    record = finetune_(candidate, run.data, config.finetune, name=name, ctx=run.ctx, seed=run.config.run.seed + len(names),
                       progress=run.progress, placement=run.placement)
    base = run.store.base_macs
    details = {**record.details, "blocks_removed": len(names), "blocks": list(names),
               "scores": {n: scores[n] for n in names}, "replacement": config.replacement,
               "flops_reduction": 1.0 - record.macs / base if base else 0.0}
    record = StageRecord(**{**record.__dict__, "kind": "search-step", "seconds": time.perf_counter() - start,
                            "details": details})
    run.store.finish(candidate, record)
    return candidate, record
