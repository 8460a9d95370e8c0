"""Gradual magnitude pruning (GMP, Zhu & Gupta 2017) over a training stage, without touching the loop.

The sparsity after optimizer step ``t`` follows the cubic schedule::

    s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** 3      for t_0 <= t <= t_1

(``s_i`` before ``t_0``, ``s_f`` after ``t_1``): fast pruning early, when the weights can still
recover, slow near the end. :class:`GradualPruner` grows the masks of
:mod:`graphprune.sparsity.unstructured` to ``s(t)`` every ``every_steps`` steps.

Drive it with :meth:`GradualPruner.step` from your own loop, or :meth:`GradualPruner.attached`,
which counts training-mode forward passes with grad enabled (one per optimizer step in a plain
loop, such as :func:`graphprune.recipes.finetune_`) through a forward pre-hook on the model,
removed on exit even on error. Evaluation passes (eval mode or ``no_grad``) are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .unstructured import (SCOPES, SIGNALS, SparsityReport, check_choice, seeded_draws, check_sparsity, grow_masks_,
                           install_masks_)
from .weights import module_sparsity, overall_sparsity, resolve_modules


def _step_count(value: int, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class GradualSchedule:
    """The cubic schedule's numbers.

    Attributes:
        final_sparsity: ``s_f``, reached at ``end_step`` and kept after it.
        end_step: ``t_1``, the optimizer step at which ``s_f`` is reached (e.g. 80 % of the stage).
        start_step: ``t_0``, the step pruning starts at.
        initial_sparsity: ``s_i``, the sparsity at ``t_0``.
        every_steps: masks are recomputed every this many steps (and at ``end_step``).
        scope: ``"local"`` or ``"global"``, as :func:`~graphprune.sparsity.magnitude_masks_`.
    """

    final_sparsity: float
    end_step: int
    start_step: int = 0
    initial_sparsity: float = 0.0
    every_steps: int = 1
    scope: str = "local"

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "GradualSchedule.final_sparsity")
        check_sparsity(self.initial_sparsity, "GradualSchedule.initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise InvalidArgumentError(f"GradualSchedule: initial_sparsity {self.initial_sparsity} is above "
                                       f"final_sparsity {self.final_sparsity}; masks only grow")
        _step_count(self.start_step, "GradualSchedule.start_step", 0)
        _step_count(self.end_step, "GradualSchedule.end_step", self.start_step + 1)
        _step_count(self.every_steps, "GradualSchedule.every_steps", 1)
        check_choice(self.scope, SCOPES, "GradualSchedule.scope")

    def sparsity_at(self, step: int) -> float:
        """``s(step)``.

        Example:
            >>> schedule = GradualSchedule(final_sparsity=0.8, end_step=10)
            >>> [round(schedule.sparsity_at(t), 4) for t in (0, 5, 10, 20)]
            [0.0, 0.7, 0.8, 0.8]
        """
        progress = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3


class GradualPruner:
    """Masks a model's layers and grows them along a :class:`GradualSchedule`.

    Args:
        model: the model; masks are installed at once (at ``initial_sparsity``).
        schedule: the schedule.
        modules: layer names; ``None``: every Conv2d / Linear but ``ignore``.
        ignore: layers left dense when ``modules`` is ``None``; ``None``: the timm classifier.
        signal: ``"magnitude"`` (GMP) or ``"random"`` (a control).
        seed: seed of the ``random`` signal.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 10))
        >>> pruner = GradualPruner(net, GradualSchedule(final_sparsity=0.5, end_step=4))
        >>> [round(pruner.step(), 3) for _ in range(2)], pruner.report().sparsity  # 44 of 100 weights
        ([0.289, 0.438], 0.44)
        >>> [round(pruner.step(), 3) for _ in range(3)], pruner.report().sparsity
        ([0.492, 0.5, 0.5], 0.5)
    """

    def __init__(self, model: nn.Module, schedule: GradualSchedule, *, modules: Iterable[str] | None = None,
                 ignore: Iterable[str] | None = None, signal: str = "magnitude", seed: int = 0) -> None:
        check_choice(signal, SIGNALS, "signal")
        self.model = model
        self.schedule = schedule
        self.signal = signal
        self.modules = resolve_modules(model, modules, ignore)
        self.steps = 0
        self._generator_seed = seed
        install_masks_(self.modules)
        self._grow(schedule.sparsity_at(0))

    def _grow(self, sparsity: float) -> None:
        seed = self._generator_seed + self.steps if self.signal == "random" else None  # a fresh draw per update
        with seeded_draws(seed):
            grow_masks_(self.modules, sparsity, scope=self.schedule.scope, signal=self.signal)

    def step(self) -> float:
        """Count one optimizer step; on an update step, grow the masks. Returns ``s(steps)``."""
        self.steps += 1
        sparsity = self.schedule.sparsity_at(self.steps)
        if self.steps % self.schedule.every_steps == 0 or self.steps == self.schedule.end_step:
            self._grow(sparsity)
        return sparsity

    def report(self) -> SparsityReport:
        """The sparsity reached so far, against the schedule's value now."""
        return SparsityReport(self.schedule.sparsity_at(self.steps), overall_sparsity(self.modules),
                              self.schedule.scope, self.signal, module_sparsity(self.modules))

    @contextmanager
    def attached(self) -> Iterator[GradualPruner]:
        """Call :meth:`step` before every training-mode, grad-enabled forward of ``model`` in the block.

        The first counted forward runs with the masks of step 0; the update of step ``t`` happens
        before forward ``t + 1``, i.e. after optimizer step ``t``.

        Example:
            >>> net = nn.Sequential(nn.Linear(10, 10))
            >>> pruner = GradualPruner(net, GradualSchedule(final_sparsity=0.5, end_step=2))
            >>> with pruner.attached():
            ...     for _ in range(3):
            ...         net(torch.zeros(1, 10)).sum().backward()
            >>> pruner.steps, pruner.report().sparsity
            (2, 0.5)
        """
        started = [False]

        def hook(module: nn.Module, args: tuple) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            if started[0]:
                self.step()
            started[0] = True

        handle = self.model.register_forward_pre_hook(hook)
        try:
            yield self
        finally:
            handle.remove()
