"""The pruning stage of a recipe: what to score with, how much to remove, and at what granularity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..scoring import get_scorer
from ..selection import PlanConfig
from .checks import check_recalibration, number_in, optional_positive_int

# What a pruning stage removes (graphprune.recipes.sparse): whole channels, K x K kernels, single weights.
GRANULARITIES = ("channel", "kernel", "unstructured")
# The scorers the kernel / unstructured granularities accept, and the weight signal each one means.
SPARSE_SIGNALS = {"l1": "magnitude", "random": "random"}
# Options the recipe supplies itself; a config may not set them.
_RECIPE_OWNED_OPTIONS = frozenset({"data", "progress", "class_means", "reference"})
# A stage's budget: exactly one of these fields is set.
_BUDGETS = ("ratio", "flops_reduction", "latency_reduction")


@dataclass(frozen=True)
class PruneConfig:
    """One pruning stage: what to score with and how much to remove.

    Attributes:
        scorer: a registered scorer name. Data-driven scorers (``taylor``, ``target_taylor``,
            ``classmean``) get the training loader as ``data=`` from the recipe.
        scorer_options: extra JSON-valued keyword arguments for the scorer (e.g.
            ``{"epochs": 1}`` for ``target_taylor``); ``data`` and ``progress`` are the recipe's.
        ratio: fraction of channels to remove; give at most one of ``ratio``, ``flops_reduction``
            and ``latency_reduction`` (none: ``flops_reduction=0.3``).
        flops_reduction: fraction of MACs to remove, verified with fvcore (the usual budget).
        latency_reduction: fraction of the measured latency to remove on this machine
            (``gp.prune(latency_reduction=...)``: per-layer latency table, then measured end to end
            until within 2 points); channel granularity, one step. The stage's record holds the
            predicted and measured reduction (``details["latency"]``).
        latency_batch_size: the batch size that latency is modelled and measured at.
        scope: ``"local"`` (same fraction per group) or ``"global"`` (one ranking; pair it with a
            scorer whose scores are comparable across layers, such as ``target_taylor``).
        max_group_ratio: cap per group for a global ranking, so no layer is stripped bare.
        residual_scale: prune the groups on a residual stream at this fraction of the others' ratio
            (:class:`graphprune.PlanConfig`; 1 treats them like the rest). The default, 0, keeps
            residual streams whole and meets the budget inside the blocks: chosen on the validation
            split of ``benchmarks/transfer.py`` (EfficientNet-Lite0 -> Flowers-17, -30 % MACs, seeds 0
            and 1, val mean: ``l1`` 0.865 vs 0.775, ``target_taylor`` 0.891 vs 0.871,
            ``classmean+reuse+align`` 0.912 vs 0.894; CUB-100 seed 0: ``classmean+align`` 0.864 vs
            0.850, ``target_taylor`` 0.814 vs 0.828). Channel granularity only: kernels and single
            weights are ranked per layer.
        scoring_batches: batches the data-driven scorers read per pass (``None``: all).
        classifier_reuse: keep the full fine-tuned model's classifier frozen while the pruned
            model is fine-tuned (the penultimate features are never pruned, so it still fits).
        alignment_weight: lambda of the class-mean alignment loss ``1 - cos(f_i, c_{y_i})`` added
            while the pruned model is fine-tuned; ``c_k`` are the full fine-tuned model's class
            means. 0 disables it.
        scale_epochs: multiply the next fine-tuning stage's epochs by ``1 / (1 - reduction)``
            with the measured FLOPs reduction, so the pruned model gets about the same compute.
        recalibrate_batches: after removal, correct every BatchNorm's running statistics on this
            many unaugmented training batches (see ``recalibration``); ``None``: all of them; 0:
            keep the stale statistics.
        recalibration: how those statistics are corrected: ``"shift"`` (the default) moves each
            BatchNorm's statistics by what the removal changed in its input, measured against
            the model before removal on the same batches
            (:func:`~graphprune.recipes.norms.shift_norms_`), so an untouched layer keeps its
            statistics and ratio 0 is the identity; ``"reset"`` re-estimates them from scratch
            (EagleEye's adaptive BN), which discards what a model fine-tuned with frozen
            statistics depends on (Lite0 -> Flowers-17, seed 0, val: the unpruned S->T model
            0.924, reset alone 0.288; after a -30 % ``target_taylor`` prune 0.235 uncorrected,
            0.147 reset, 0.788 shifted).
        granularity: what is removed (:mod:`graphprune.recipes.sparse`): ``"channel"`` (whole
            channels, a smaller dense model: the engine's plan), ``"kernel"`` (the same number of
            ``kh x kw`` kernels per output channel of each dense conv, a gather + grouped conv) or
            ``"unstructured"`` (single weights of every Conv2d / Linear, as masks). The two fine
            granularities need ``flops_reduction`` (for unstructured, of the *effective* MACs:
            nonzero weights only) and ``scorer="l1"`` (weight magnitude) or ``"random"``, the two
            signals *Towards compute-optimal transfer learning* compares; ``scope="global"``
            (one magnitude ranking, each weight costing its layer's MACs per weight) is for
            unstructured only. They stay ``torch.nn.utils.prune`` masks while the model trains
            (kernel-shaped for ``"kernel"``: the same function at dense-kernel speed), so every
            fine-tuning stage keeps them; the recipe returns them made permanent (plain zeros) or,
            for ``"kernel"``, as :class:`~graphprune.sparsity.KernelConv2d` layers.
        gradual: unstructured only: grow the masks during the next fine-tuning stage along GMP's
            cubic schedule (from 0 to the budget's sparsity) instead of in one shot; that stage
            must train the backbone (``epochs > 0``, ``mode="full"``).
        gradual_end_fraction: the share of that stage's steps at which the final sparsity is reached.
        steps: iterative pruning: reach ``flops_reduction`` in this many equal steps of the
            unpruned model's MACs (step ``i`` ends at ``i / steps`` of the budget), each followed by
            ``1 / steps`` of the fine-tuning after pruning, so the training compute stays about the
            same as one cut; channel granularity and ``flops_reduction`` only. 1: one cut.
        keep_masks: kernel and unstructured: return the model with its masks (to train further,
            or to evaluate at dense speed) instead of the permanent form (to save and deploy);
            stage checkpoints hold masks either way.
    """

    scorer: str = "l1"
    scorer_options: Mapping[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    flops_reduction: float | None = None  # None with no other budget: 0.3 (set in __post_init__)
    latency_reduction: float | None = None
    latency_batch_size: int = 1
    scope: str = "local"
    max_group_ratio: float | None = None
    residual_scale: float = 0.0
    scoring_batches: int | None = None
    classifier_reuse: bool = False
    alignment_weight: float = 0.0
    scale_epochs: bool = False
    recalibrate_batches: int | None = 16
    recalibration: str = "shift"
    granularity: str = "channel"
    gradual: bool = False
    gradual_end_fraction: float = 0.8
    keep_masks: bool = False
    steps: int = 1

    def __post_init__(self) -> None:
        get_scorer(self.scorer)  # unknown names raise with the list of known ones
        if not isinstance(self.scorer_options, Mapping) or not all(isinstance(k, str) for k in self.scorer_options):
            raise InvalidArgumentError(f"PruneConfig.scorer_options must be a dict, got {self.scorer_options!r}")
        owned = sorted(set(self.scorer_options) & _RECIPE_OWNED_OPTIONS)
        if owned:
            raise InvalidArgumentError(f"PruneConfig.scorer_options may not set {owned}: the recipe supplies them")
        if self.granularity in GRANULARITIES[1:] and self.ratio is not None:
            raise InvalidArgumentError(f"granularity={self.granularity!r} prunes to a FLOPs budget: give "
                                       "flops_reduction=, not ratio= (a fraction of channels has no meaning for "
                                       "kernels or single weights)")
        self._check_budget()
        self.plan_config()  # checks scope, max_group_ratio and residual_scale
        optional_positive_int("PruneConfig.scoring_batches", self.scoring_batches)
        number_in("PruneConfig.alignment_weight", self.alignment_weight, low=0.0)
        if self.recalibrate_batches is not None and (isinstance(self.recalibrate_batches, bool)
                                                     or not isinstance(self.recalibrate_batches, int)
                                                     or self.recalibrate_batches < 0):
            raise InvalidArgumentError(f"PruneConfig.recalibrate_batches must be an int >= 0 or None, "
                                       f"got {self.recalibrate_batches!r}")
        check_recalibration("PruneConfig", self.recalibration)
        self._check_granularity()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidArgumentError(f"PruneConfig.steps must be an int >= 1, got {self.steps!r}")
        if self.steps > 1 and (self.granularity != "channel" or self.flops_reduction is None):
            raise InvalidArgumentError("PruneConfig.steps > 1 prunes channels to a FLOPs budget in steps: it needs "
                                       "granularity='channel' and flops_reduction=")

    def _check_budget(self) -> None:
        given = [name for name in _BUDGETS if getattr(self, name) is not None]
        if not given:
            object.__setattr__(self, "flops_reduction", 0.3)  # the default budget
            given = ["flops_reduction"]
        if len(given) > 1:
            raise InvalidArgumentError(f"PruneConfig takes exactly one of ratio=, flops_reduction= and "
                                       f"latency_reduction=, got {' and '.join(given)}")
        if self.ratio is not None:
            number_in("PruneConfig.ratio", self.ratio, low=0.0, high=1.0, high_open=True)
        elif self.flops_reduction is not None:
            number_in("PruneConfig.flops_reduction", self.flops_reduction, low=0.0, high=1.0, low_open=True,
                      high_open=True)
        else:
            number_in("PruneConfig.latency_reduction", self.latency_reduction, low=0.0, high=1.0, low_open=True,
                      high_open=True)
            if self.granularity != "channel" or self.steps != 1:
                raise InvalidArgumentError("PruneConfig.latency_reduction removes channels in one cut: it needs "
                                           f"granularity='channel' and steps=1, got {self.granularity!r}, "
                                           f"steps={self.steps!r}")
        size = self.latency_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError(f"PruneConfig.latency_batch_size must be a positive int, got {size!r}")

    def budget(self) -> dict[str, float]:
        """The engine's budget keyword for this stage: ``ratio``, ``flops_reduction`` or ``latency_reduction``.

        Example:
            >>> PruneConfig().budget(), PruneConfig(latency_reduction=0.2).budget()
            ({'flops_reduction': 0.3}, {'latency_reduction': 0.2})
        """
        name = next(n for n in _BUDGETS if getattr(self, n) is not None)
        return {name: getattr(self, name)}

    def step_reductions(self) -> tuple[float, ...]:
        """Each step's ``flops_reduction`` of the model it starts from, so step ``i`` ends at ``i / steps``
        of the budget measured on the unpruned model.

        Example:
            >>> [round(r, 4) for r in PruneConfig(flops_reduction=0.3, steps=3).step_reductions()]
            [0.1, 0.1111, 0.125]
            >>> PruneConfig(flops_reduction=0.3).step_reductions()  # one cut: the budget itself
            (0.3,)
        """
        budget = self.flops_reduction
        if budget is None:
            raise InvalidArgumentError(f"PruneConfig.step_reductions() splits a FLOPs budget; this config prunes "
                                       f"by {next(iter(self.budget()))}=")
        if self.steps == 1:
            return (budget,)
        ends = [budget * i / self.steps for i in range(self.steps + 1)]
        return tuple(1.0 - (1.0 - ends[i]) / (1.0 - ends[i - 1]) for i in range(1, self.steps + 1))

    def _check_granularity(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InvalidArgumentError(f"PruneConfig.granularity must be one of {GRANULARITIES}, "
                                       f"got {self.granularity!r}")
        for name in ("gradual", "keep_masks"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"PruneConfig.{name} must be a bool, got {getattr(self, name)!r}")
        number_in("PruneConfig.gradual_end_fraction", self.gradual_end_fraction, low=0.0, high=1.0, low_open=True)
        if self.granularity == "channel":
            if self.gradual or self.keep_masks:
                raise InvalidArgumentError("PruneConfig.gradual and keep_masks apply to granularity 'kernel' or "
                                           "'unstructured'; channel pruning removes channels and leaves no mask")
            return
        where = f"granularity={self.granularity!r}"
        if self.scorer not in SPARSE_SIGNALS:
            raise InvalidArgumentError(f"{where} ranks weights by magnitude or at random: scorer must be one of "
                                       f"{sorted(SPARSE_SIGNALS)}, got {self.scorer!r} (a channel scorer scores "
                                       "channels, not kernels or single weights)")
        if self.scorer_options:
            raise InvalidArgumentError(f"{where} takes no scorer_options (the random signal is seeded by "
                                       f"RunConfig.seed), got {dict(self.scorer_options)!r}")
        if self.max_group_ratio is not None:
            raise InvalidArgumentError(f"max_group_ratio caps channel groups; it does not apply to {where}")
        if self.scope == "global" and (self.granularity == "kernel" or self.scorer == "random"):
            raise InvalidArgumentError(f"scope='global' is one magnitude ranking of single weights: it needs "
                                       f"granularity='unstructured' and scorer='l1', not {where}, "
                                       f"scorer={self.scorer!r}")
        if self.gradual and self.granularity != "unstructured":
            raise InvalidArgumentError(f"gradual=True grows unstructured masks; it does not apply to {where}")

    @property
    def signal(self) -> str:
        """The weight ranking of the kernel and unstructured granularities: ``"magnitude"`` or ``"random"``.

        Example:
            >>> PruneConfig(granularity="kernel", scorer="l1").signal
            'magnitude'
        """
        return SPARSE_SIGNALS.get(self.scorer, self.scorer)

    def plan_config(self) -> PlanConfig:
        """The engine's selection options for this stage.

        Example:
            >>> PruneConfig(scope="global").plan_config().scope
            'global'
        """
        return PlanConfig(scope=self.scope, max_group_ratio=self.max_group_ratio, residual_scale=self.residual_scale)
