"""NetTailor-style learned block gates: how much does the target task need each block?

Every candidate block's branch output is multiplied by a gate ``g = sigmoid(theta)``
(and, with proxies, ``(1 - g)`` times a cheap :class:`~.modules.Proxy` of the branch is
added). With the network's weights frozen, only the gates (and proxies) train, on target
data, under

``loss = CE(student(x), y)
       + complexity_weight * sum_b (g_b * macs_b + (1 - g_b) * proxy_macs_b) / model_macs
       + teacher_weight * mean_m ||s_m - t_m||^2 / ||t_m||^2``

where ``s_m`` / ``t_m`` are the outputs of each block module in the student and in the
teacher (the fine-tuned full model). The complexity term pushes costly gates to zero; the
cross entropy and the teacher term keep the blocks the task needs open. The trained gate
values are the block importances; the trained proxies can stand in for removed blocks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..tracer import preserved_state
from .discovery import Block, Blocks
from .modules import Proxy


@dataclass(frozen=True)
class GateConfig:
    """Gate training settings.

    Attributes:
        epochs: passes over the training data (fractional: that share of one pass).
        lr: Adam learning rate of the gate logits (they start at ``init_logit``).
        proxy_lr: Adam learning rate of the proxies.
        init_logit: starting ``theta``; 3.0 opens every gate to 0.95.
        complexity_weight: weight of the normalized expected MACs of the kept blocks.
        teacher_weight: weight of the relative L2 distance to the teacher's block outputs.
        proxies: train a proxy beside every block that can have one.
        max_batches_per_epoch: cap on batches per epoch (``None``: all).
    """

    epochs: float = 1.0
    lr: float = 0.1
    proxy_lr: float = 1e-3
    init_logit: float = 3.0
    complexity_weight: float = 1.0
    teacher_weight: float = 1.0
    proxies: bool = False
    max_batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "complexity_weight", "teacher_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"GateConfig.{name} must be a number >= 0, got {value!r}")
        for name in ("lr", "proxy_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgumentError(f"GateConfig.{name} must be a number > 0, got {value!r}")
        if self.max_batches_per_epoch is not None and (isinstance(self.max_batches_per_epoch, bool)
                                                       or not isinstance(self.max_batches_per_epoch, int)
                                                       or self.max_batches_per_epoch < 1):
            raise InvalidArgumentError(f"GateConfig.max_batches_per_epoch must be a positive int or None, "
                                       f"got {self.max_batches_per_epoch!r}")


@dataclass(frozen=True)
class GateResult:
    """What gate training learned.

    Attributes:
        scores: ``{block name: final gate value in (0, 1)}``; higher = the task needs it more.
        proxies: trained proxies by block name (empty without ``GateConfig.proxies``).
        losses: mean training loss per epoch (cross entropy + penalties).
        steps: optimizer steps taken.
    """

    scores: dict[str, float]
    proxies: dict[str, Proxy] = field(default_factory=dict)
    losses: tuple[float, ...] = ()
    steps: int = 0


def _proxy_macs(block: Block) -> int:
    out = block.output_shape
    return block.input_shape[1] * out[1] * out[2] * out[3] if len(out) == 4 else 0


@contextmanager
def _gated(model: nn.Module, blocks: tuple[Block, ...], gates: torch.Tensor, proxies: dict[str, Proxy]
           ) -> Iterator[None]:
    """Hooks: each block's last branch child output -> ``g * out (+ (1 - g) * proxy(branch input))``."""
    handles = []
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(_m, args, _kwargs=None):
            inputs[name] = args[0]
        return hook

    def gate(i: int, name: str):
        def hook(_m, _args, out):
            g = torch.sigmoid(gates[i])
            result = out * g
            if name in proxies:
                result = result + (1 - g) * proxies[name](inputs.pop(name))
            return result
        return hook

    try:
        for i, block in enumerate(blocks):
            first = model.get_submodule(f"{block.module}.{block.children[0]}")
            last = model.get_submodule(f"{block.module}.{block.children[-1]}")
            if block.name in proxies:
                handles.append(first.register_forward_pre_hook(keep_input(block.name)))
            handles.append(last.register_forward_hook(gate(i, block.name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _block_outputs(model: nn.Module, modules: list[str], into: dict[str, torch.Tensor]) -> Iterator[None]:
    def keep(name: str):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                into[name] = out
        return hook

    handles = [model.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches_per_epoch(data, cap: int | None) -> int:
    """Batches one gate epoch reads: the loader's length, at most ``cap``; data without a length needs a cap."""
    count = len(data) if hasattr(data, "__len__") else None
    if cap is not None:
        count = min(count or cap, cap)
    if count is None:
        raise InvalidArgumentError("data must have a length (a DataLoader or a list of batches)")
    return count


def _gate_loss(logits: torch.Tensor, labels: torch.Tensor, modules: Sequence[str], mine: Mapping[str, torch.Tensor],
               target: Mapping[str, torch.Tensor], open_: torch.Tensor, macs: torch.Tensor, proxy_macs: torch.Tensor,
               config: GateConfig) -> torch.Tensor:
    """Cross entropy + ``complexity_weight`` x the expected MACs share (a gate ``g`` open: the block's MACs,
    closed: its proxy's) + ``teacher_weight`` x the blocks' outputs' relative distance to the teacher's."""
    complexity = (open_ * macs + (1 - open_) * proxy_macs).sum()
    distance = torch.stack([(mine[m] - target[m]).pow(2).mean() / target[m].pow(2).mean().clamp_min(1e-12)
                            for m in modules]).mean()
    return F.cross_entropy(logits, labels) + config.complexity_weight * complexity + config.teacher_weight * distance


def train_gates(blocks: Blocks, model: nn.Module, data: Iterable, *, teacher: nn.Module | None = None,
                config: GateConfig | None = None, candidates: tuple[Block, ...] | None = None,
                progress: bool = False) -> GateResult:
    """Learn one gate per block (and optional proxies) on target data, weights frozen.

    Args:
        blocks: from :func:`~.discovery.find_blocks` on ``model``.
        model: the network to gate (usually the fine-tuned full model); left unchanged.
        data: an iterable of ``(images, labels)`` batches (a ``DataLoader``), re-iterated per epoch.
        teacher: the model whose block outputs the student should keep (``None``: ``model``
            itself, i.e. the fine-tuned model teaches its gated copy).
        config: the training settings.
        candidates: the blocks to gate (``None``: every block that can be removed).
        progress: show a tqdm bar.

    Returns:
        The :class:`GateResult`.

    Example:
        >>> import timm, torch
        >>> from graphprune.blocks import find_blocks
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> blocks = find_blocks(model, torch.randn(1, 3, 32, 32))
        >>> batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
        >>> result = train_gates(blocks, model, batches, config=GateConfig(epochs=2))
        >>> sorted(result.scores) == [b.name for b in blocks.candidates("identity")], result.steps
        (True, 2)
    """
    config = config or GateConfig()
    chosen = candidates if candidates is not None else (
        blocks.candidates("proxy") if config.proxies else blocks.candidates("identity"))
    if not chosen:
        raise InvalidArgumentError("no removable blocks to gate")
    if config.proxies and not all(b.proxy for b in chosen):
        raise InvalidArgumentError(f"blocks without a proxy cannot be gated with proxies: "
                                   f"{[b.name for b in chosen if not b.proxy]}")
    student = copy.deepcopy(model)
    teacher = teacher if teacher is not None else model
    param = next(student.parameters())
    student.requires_grad_(False)
    gates = torch.full((len(chosen),), float(config.init_logit), device=param.device, requires_grad=True)
    proxies = {b.name: Proxy(**b.proxy_spec()).to(param.device, param.dtype) for b in chosen} if config.proxies else {}
    groups = [{"params": [gates], "lr": config.lr}]
    if proxies:
        groups.append({"params": [p for proxy in proxies.values() for p in proxy.parameters()], "lr": config.proxy_lr})
    optimizer = torch.optim.Adam(groups)
    total = float(blocks.macs) or 1.0
    macs = torch.tensor([b.macs / total for b in chosen], device=param.device)
    proxy_macs = torch.tensor([_proxy_macs(b) / total if proxies else 0.0 for b in chosen], device=param.device)
    modules = list(dict.fromkeys(b.module for b in chosen))
    losses: list[float] = []
    steps = 0
    batches_per_epoch = _batches_per_epoch(data, config.max_batches_per_epoch)
    total_steps = round(config.epochs * batches_per_epoch)
    bar = tqdm(total=total_steps, desc="gates", disable=not progress, leave=False)
    with preserved_state(teacher), preserved_state(student):
        teacher.eval()
        student.eval()  # frozen weights: batch norm keeps the fine-tuned statistics
        for proxy in proxies.values():
            proxy.train()
        while steps < total_steps:
            epoch_losses = []
            for number, (images, labels) in enumerate(data):
                if number >= batches_per_epoch or steps >= total_steps:
                    break
                images, labels = images.to(param.device), labels.to(param.device)
                target: dict[str, torch.Tensor] = {}
                with torch.no_grad(), _block_outputs(teacher, modules, target):
                    teacher(images)
                mine: dict[str, torch.Tensor] = {}
                with _gated(student, chosen, gates, proxies), _block_outputs(student, modules, mine):
                    logits = student(images)
                loss = _gate_loss(logits, labels, modules, mine, target, torch.sigmoid(gates), macs, proxy_macs, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                epoch_losses.append(loss.item())
                bar.update(1)
            if not epoch_losses:
                break
            losses.append(sum(epoch_losses) / len(epoch_losses))
    bar.close()
    for proxy in proxies.values():
        proxy.eval()
        proxy.requires_grad_(True)
    scores = {b.name: float(torch.sigmoid(gates[i].detach())) for i, b in enumerate(chosen)}
    return GateResult(scores, proxies, tuple(losses), steps)
