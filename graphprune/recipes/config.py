"""Recipe configurations: frozen dataclasses, validated on construction, JSON out via ``to_dict``.

A recipe is data: one of these configs in, a metrics record (and checkpoints) out. Every
check that can fail runs when the config is built, so a bad value raises
:class:`graphprune.InvalidArgumentError` before any data is read or any weight trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..selection import PlanConfig
from .checks import check_recalibration, number_in, optional_positive_int
from .prune_config import PruneConfig  # noqa: F401  (every config from one module)

FINETUNE_MODES = ("full", "linear")
OPTIMIZERS = ("adamw", "sgd")  # the two the docs discuss; any timm optimizer name works
HEAD_INITS = ("probe", "random")
NORM_STATS = ("frozen", "train")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning stage, built from timm's optimizer and scheduler (see :mod:`.finetune`).

    The defaults are the ones this project measured strong on its shared few-shot targets
    (EfficientNet-Lite0 -> Flowers-17 / CUB-100 at 128 px, ``benchmarks/transfer.py``), chosen
    on the validation split only.

    Attributes:
        epochs: passes over the training data; fractional values train that share of one pass
            (the schedule is counted in optimizer steps, ``round(epochs * batches_per_epoch)``).
            0 skips training (the stage only evaluates).
        mode: ``"full"`` trains every weight; ``"linear"`` trains only the classifier and keeps
            the backbone in eval mode, so its BatchNorm statistics stay those of the source.
        optimizer: any name of ``timm.optim.list_optimizers()``, built by
            ``timm.optim.create_optimizer_v2`` (``"adamw"``: forgiving with few steps;
            ``"sgd"``: momentum 0.9, the classic choice for long schedules).
        lr: peak learning rate of the backbone; warmup, then a cosine decay to 0 over the steps.
        head_lr_scale: in ``full`` mode the classifier's learning rate is ``lr * head_lr_scale``;
            in ``linear`` mode the classifier is all that trains and ``lr`` is its rate. Keep 1
            when the head starts from a linear probe (``head_init="probe"``, the default: on
            Lite0 -> Flowers-17 val, 10 epochs, 1.0 gave 0.906 vs the probe's 0.882, while 10.0
            fell to 0.871 after 6 epochs, below the probe); use ~10 for a fresh random head.
        layer_decay: timm's layer-wise learning-rate decay (e.g. 0.75: each block deeper from
            the head trains at 0.75x the rate of the next); ``None``: one rate for the backbone.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay; timm exempts biases and
            normalization weights.
        warmup_fraction: share of the steps with a linear warmup from 1 % of the rate.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: keep an exponential moving average of the weights (timm ``ModelEmaV3``)
            and end the stage with it; ``None``: off.
        norm_stats: ``"frozen"`` keeps every BatchNorm in eval mode while the weights train
            (it normalizes with the running statistics it had, its affine weights still train);
            ``"train"`` normalizes with batch statistics and updates the running ones. Frozen is
            the default because a pretrained BatchNorm's batch statistics on a small target set
            differ from its running ones: on ImageNet Lite0 -> Flowers-17 the pre-logits
            features of one batch in train vs eval mode have cosine 0.25 (128 px), so a linear
            probe that fits eval-mode features sees a loss of 4.8 instead of 0.2 in train mode
            and its first steps wreck the pretrained features (Lite0 -> Flowers-17, 8 epochs from
            the probe: val 0.906 frozen vs 0.894 train). After pruning too: the recipes shift
            the statistics by what the removal changed (:attr:`PruneConfig.recalibration`) and
            keep them frozen while the pruned model fine-tunes (Lite0 -> Flowers-17, seed 0,
            -30 % MACs, 4 epochs, val: classmean + alignment 0.912 frozen vs 0.853 train,
            target_taylor 0.865 vs 0.824). Frozen statistics also tolerate less learning rate:
            keep ``lr`` near the default.
        distill: weight ``a`` of knowledge distillation from a teacher (the recipes pass the
            fine-tuned model before pruning): the loss is ``(1 - a) * CE + a * T^2 *
            KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015). 0: plain
            cross entropy; it needs a ``teacher`` in :func:`~graphprune.recipes.finetune.finetune_`.
        distill_temperature: the softmax temperature ``T`` of the distillation term.
        max_batches_per_epoch: cap on batches per epoch (small smoke runs); ``None``: all.
    """

    epochs: float = 10.0
    mode: str = "full"
    optimizer: str = "adamw"
    lr: float = 5e-4
    head_lr_scale: float = 1.0
    layer_decay: float | None = None
    weight_decay: float = 0.02
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    ema_decay: float | None = None
    norm_stats: str = "frozen"
    distill: float = 0.0
    distill_temperature: float = 2.0
    max_batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        number_in("FinetuneConfig.epochs", self.epochs, low=0.0)
        if self.norm_stats not in NORM_STATS:
            raise InvalidArgumentError(f"FinetuneConfig.norm_stats must be one of {NORM_STATS}, got {self.norm_stats!r}")
        if self.mode not in FINETUNE_MODES:
            raise InvalidArgumentError(f"FinetuneConfig.mode must be one of {FINETUNE_MODES}, got {self.mode!r}")
        known = _timm_optimizers()
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in known:
            raise InvalidArgumentError(f"FinetuneConfig.optimizer {self.optimizer!r} is not a timm optimizer; "
                                       f"known: {', '.join(OPTIMIZERS)}, ... (timm.optim.list_optimizers())")
        number_in("FinetuneConfig.lr", self.lr, low=0.0, low_open=True)
        number_in("FinetuneConfig.head_lr_scale", self.head_lr_scale, low=0.0, low_open=True)
        if self.layer_decay is not None:
            number_in("FinetuneConfig.layer_decay", self.layer_decay, low=0.0, high=1.0, low_open=True)
        number_in("FinetuneConfig.weight_decay", self.weight_decay, low=0.0)
        number_in("FinetuneConfig.warmup_fraction", self.warmup_fraction, low=0.0, high=1.0, high_open=True)
        number_in("FinetuneConfig.distill", self.distill, low=0.0, high=1.0)
        number_in("FinetuneConfig.distill_temperature", self.distill_temperature, low=0.0, low_open=True)
        number_in("FinetuneConfig.label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        if self.ema_decay is not None:
            number_in("FinetuneConfig.ema_decay", self.ema_decay, low=0.0, high=1.0, low_open=True, high_open=True)
        optional_positive_int("FinetuneConfig.max_batches_per_epoch", self.max_batches_per_epoch)


def _timm_optimizers() -> frozenset[str]:
    import timm.optim

    return frozenset(timm.optim.list_optimizers())


@dataclass(frozen=True)
class RunConfig:
    """Where a recipe runs and writes, and how it reports.

    Attributes:
        checkpoint_dir: a directory for one checkpoint per finished stage plus ``metrics.json``
            and ``metrics.csv``; a rerun with the same directory resumes after the last finished
            stage. ``None`` writes nothing.
        seed: seeds torch, Python's ``random`` and NumPy before anything random (new
            classifier, data order, augmentation, random scorer); with the same seed, config and
            thread count two CPU runs give bit-identical weights.
        progress: show tqdm bars (rank 0 only under DDP).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under
            ``torchrun`` each rank takes ``cuda:LOCAL_RANK``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on the CPU), ``"bf16"`` or ``"fp32"``.
        channels_last: ``"auto"`` (on for conv nets), ``"on"`` or ``"off"``.
    """

    checkpoint_dir: str | None = None
    seed: int = 0
    progress: bool = True
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgumentError(f"RunConfig.seed must be an int, got {self.seed!r}")
        from .device import LAYOUTS, PRECISIONS, resolve_device

        resolve_device(self.device)  # unknown names and CUDA without CUDA fail here, before any data
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"RunConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.channels_last not in LAYOUTS:
            raise InvalidArgumentError(f"RunConfig.channels_last must be one of {LAYOUTS}, got {self.channels_last!r}")


@dataclass(frozen=True)
class TransferConfig:
    """S->T, S->TP->T and SP->T in one shape: which stages run is decided by the recipe.

    Attributes:
        source: the first fine-tuning stage (S->T, and the "S->T" part of S->TP->T).
        prune: the pruning stage (S->TP->T, SP->T).
        target: the fine-tuning stage after pruning (default: 5 epochs, BatchNorm statistics
            frozen as the prune stage corrected them); ``epochs=0`` in SP->T is zero-shot pruning.
        run: checkpoints, seed, progress, device.
        head_init: ``"probe"`` fits the new classifier as a linear probe on the frozen
            features first (stage ``probe``, L-BFGS logistic regression, weight decay chosen on
            val), then fine-tunes from it (LP-FT, Kumar et al., ICLR 2022): the probe is the
            reference every recipe should beat, and starting from it keeps short schedules
            from distorting the pretrained features. ``"random"``: timm's fresh head.
    """

    source: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    target: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5.0))
    run: RunConfig = field(default_factory=RunConfig)
    head_init: str = "probe"

    def __post_init__(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise InvalidArgumentError(f"TransferConfig.head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.prune.gradual and (self.target.epochs == 0 or self.target.mode != "full"):
            raise InvalidArgumentError("PruneConfig(gradual=True) grows the masks while the backbone trains: it needs "
                                       "target.epochs > 0 and target.mode='full'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Example:
            >>> TransferConfig().to_dict()["prune"]["flops_reduction"]
            0.3
        """
        return json_ready(asdict(self))


@dataclass(frozen=True)
class TransTailorConfig:
    """TransTailor's iterative search (Liu et al., AAAI 2021), as this package runs it.

    Importance-aware fine-tuning multiplies each kept channel by ``beta`` = the channel scale
    ``alpha`` that ``target_taylor`` trained on the target data (frozen weights), on the layers
    where it was trained; the Taylor scores only rank channels. The paper's "normalized
    importance" also reads as ``score / mean score``, but those ratios span 0.02-50 within a
    layer of EfficientNet-Lite0 and sent the first 10 % step to chance accuracy, so they are
    not used as a scale (see :mod:`graphprune.recipes.transtailor`).

    Attributes:
        source: fine-tuning of the full model before the search.
        step_flops_reduction: z, the share of the *current* model's MACs removed per step.
        max_steps: stop after this many steps even if accuracy holds.
        tau: stop once validation accuracy falls more than ``tau`` (a fraction, e.g. 0.02)
            below the best seen so far; the best sub-model is returned.
        alpha_epochs: passes of target-aware alpha training inside ``target_taylor``; the
            trained alphas are the ``beta`` of the fine-tuning (0: alphas stay 1, plain fine-tuning).
        alpha_lr: Adam learning rate of the alphas.
        scoring_batches: batches ``target_taylor`` reads per pass (``None``: all).
        scope: ranking of the importance; ``"global"`` is the paper's choice and suits
            ``target_taylor``'s loss-unit scores.
        max_group_ratio: cap per group and step for the global ranking.
        finetune: the importance-aware fine-tuning after every step.
        run: checkpoints, seed, progress, device.
        head_init: ``"probe"`` (a linear probe first, as in :class:`TransferConfig`) or ``"random"``.
        recalibrate_batches: BatchNorm statistics corrected after each step's removal, as
            :attr:`PruneConfig.recalibrate_batches`.
        recalibration: ``"shift"`` or ``"reset"``, as :attr:`PruneConfig.recalibration`.
    """

    source: FinetuneConfig = field(default_factory=FinetuneConfig)
    step_flops_reduction: float = 0.1
    max_steps: int = 5
    tau: float = 0.02
    alpha_epochs: int = 1
    alpha_lr: float = 0.01
    scoring_batches: int | None = None
    scope: str = "global"
    max_group_ratio: float | None = 0.5
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=3.0))
    run: RunConfig = field(default_factory=RunConfig)
    head_init: str = "probe"
    recalibrate_batches: int | None = 16
    recalibration: str = "shift"

    def __post_init__(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise InvalidArgumentError(f"TransTailorConfig.head_init must be one of {HEAD_INITS}, "
                                       f"got {self.head_init!r}")
        number_in("TransTailorConfig.step_flops_reduction", self.step_flops_reduction, low=0.0, high=1.0,
                low_open=True, high_open=True)
        optional_positive_int("TransTailorConfig.max_steps", self.max_steps)
        number_in("TransTailorConfig.tau", self.tau, low=0.0)
        if isinstance(self.alpha_epochs, bool) or not isinstance(self.alpha_epochs, int) or self.alpha_epochs < 0:
            raise InvalidArgumentError(f"TransTailorConfig.alpha_epochs must be an int >= 0, got {self.alpha_epochs!r}")
        number_in("TransTailorConfig.alpha_lr", self.alpha_lr, low=0.0, low_open=True)
        optional_positive_int("TransTailorConfig.scoring_batches", self.scoring_batches)
        PlanConfig(scope=self.scope, normalize="none", max_group_ratio=self.max_group_ratio)
        check_recalibration("TransTailorConfig", self.recalibration)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Example:
            >>> TransTailorConfig(tau=0.05).to_dict()["tau"]
            0.05
        """
        return json_ready(asdict(self))


def json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
