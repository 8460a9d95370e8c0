"""Block plans: which residual branches to remove and what stands in for them, as JSON data.

A :class:`BlockPlan` is to blocks what :class:`graphprune.Plan` is to channels: it names
module paths only, so it can be saved, inspected and re-applied to a fresh model without
tracing (``graphprune.load`` does exactly that). Only :func:`apply_block_plan_` mutates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .._runtime import json_record
from ..errors import InvalidArgumentError
from ..history import entry_format
from .discovery import Block, Blocks, find_blocks  # noqa: F401  (find_blocks: docstring example)

BLOCK_PLAN_FORMAT = "graphprune.blocks/1"
REPLACEMENTS = ("identity", "proxy")


@dataclass(frozen=True)
class BlockEdit:
    """One removed branch.

    Attributes:
        block: the block's name (:attr:`Block.name`).
        module: the block module.
        children: its branch children, in execution order; the first becomes the stand-in,
            the rest :class:`~.modules.Skip`.
        replacement: ``"identity"`` (the branch adds zero) or ``"proxy"``.
        proxy: ``(in_channels, out_channels, stride)`` of the proxy, ``None`` for identity.
    """

    block: str
    module: str
    children: tuple[str, ...]
    replacement: str
    proxy: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class BlockPlan:
    """Blocks to remove (see :func:`make_block_plan`).

    Attributes:
        edits: one :class:`BlockEdit` per removed block, in execution order.
    """

    edits: tuple[BlockEdit, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the removed blocks."""
        return tuple(e.block for e in self.edits)

    def to_json(self) -> str:
        """Serialize (round-trips through :meth:`from_json`).

        Example:
            >>> plan = BlockPlan((BlockEdit("layer1.1", "layer1.1", ("conv1", "bn1"), "identity"),))
            >>> BlockPlan.from_json(plan.to_json()) == plan
            True
        """
        return json.dumps({"format": BLOCK_PLAN_FORMAT, "edits": [
            {"block": e.block, "module": e.module, "children": list(e.children), "replacement": e.replacement,
             "proxy": list(e.proxy) if e.proxy is not None else None} for e in self.edits]})

    @staticmethod
    def from_json(text: str) -> BlockPlan:
        """Parse a plan written by :meth:`to_json`; raises ``InvalidArgumentError`` on anything else.

        Every field is type-checked, and a proxy's ``(in_channels, out_channels, stride)``
        must be positive and at most :data:`MAX_PROXY_CHANNELS` / :data:`MAX_PROXY_STRIDE`,
        so a damaged plan cannot ask for a huge proxy.

        Example:
            >>> try:
            ...     BlockPlan.from_json('{"format": "graphprune.blocks/1", "edits": [{"block": "b", "module": "b", '
            ...                         '"children": ["conv"], "replacement": "proxy", "proxy": [-1, 0, 0]}]}')
            ... except InvalidArgumentError as error:
            ...     print(str(error).partition("block plan: ")[2][:60])
            proxy of 'b' must be [in_channels, out_channels, stride], po
        """
        try:
            data = json_record(text, BLOCK_PLAN_FORMAT, "block plan")
            if not isinstance(data["edits"], list):
                raise ValueError("edits must be a list")
            edits = tuple(_edit_from(e) for e in data["edits"])
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
            raise InvalidArgumentError(f"not a graphprune block plan: {error}") from error
        return BlockPlan(edits)


MAX_PROXY_CHANNELS = 1 << 20  # a proxy's in/out channels; wider than any real block
MAX_PROXY_STRIDE = 1 << 10


def _edit_from(entry: object) -> BlockEdit:
    if not isinstance(entry, dict):
        raise ValueError(f"a block edit is a JSON object, got {entry!r:.80}")
    block, module, children = entry["block"], entry["module"], entry["children"]
    if not isinstance(block, str) or not isinstance(module, str):
        raise ValueError(f"block and module must be strings, got {block!r:.80}, {module!r:.80}")
    if not isinstance(children, list) or not children or not all(isinstance(c, str) and c for c in children):
        raise ValueError(f"children of {block!r} must be a non-empty list of names, got {children!r:.80}")
    replacement = entry["replacement"]
    if replacement not in REPLACEMENTS:
        raise ValueError(f"unknown replacement {replacement!r:.80}; known: {', '.join(REPLACEMENTS)}")
    proxy = entry.get("proxy")
    if replacement == "identity":
        if proxy is not None:
            raise ValueError(f"an identity replacement has no proxy, got {proxy!r:.80} for {block!r}")
        return BlockEdit(block, module, tuple(children), replacement)
    limits = (MAX_PROXY_CHANNELS, MAX_PROXY_CHANNELS, MAX_PROXY_STRIDE)
    if (not isinstance(proxy, list) or len(proxy) != 3
            or not all(type(v) is int and 1 <= v <= high for v, high in zip(proxy, limits))):
        raise ValueError(f"proxy of {block!r} must be [in_channels, out_channels, stride], positive ints up to "
                         f"{list(limits)}, got {proxy!r:.80}")
    return BlockEdit(block, module, tuple(children), replacement, tuple(proxy))


def is_block_plan(text: str) -> bool:
    """Whether a history entry (JSON text) is a block plan rather than a channel plan.

    Example:
        >>> is_block_plan(BlockPlan(()).to_json()), is_block_plan('{"format": "graphprune.plan/2"}')
        (True, False)
    """
    return entry_format(text) == BLOCK_PLAN_FORMAT


def select_blocks(blocks: Blocks, scores: Mapping[str, float], *, k: int | None = None,
                  threshold: float | None = None, replacement: str = "identity") -> tuple[Block, ...]:
    """The blocks to remove: the ``k`` lowest-scoring, or all scoring below ``threshold``,
    among those ``replacement`` can remove.

    Args:
        blocks: from :func:`~.discovery.find_blocks`.
        scores: ``{block name: score}``, higher = more important; every candidate needs one.
        k: how many to remove (give exactly one of ``k`` and ``threshold``).
        threshold: remove candidates scoring strictly below it.
        replacement: ``"identity"`` or ``"proxy"``.

    Example:
        >>> select_blocks(Blocks(()), {}, k=0)
        ()
    """
    if replacement not in REPLACEMENTS:
        raise InvalidArgumentError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
    if (k is None) == (threshold is None):
        raise InvalidArgumentError("give exactly one of k= and threshold=")
    candidates = blocks.candidates(replacement)
    missing = [b.name for b in candidates if b.name not in scores]
    if missing:
        raise InvalidArgumentError(f"no score for blocks {missing}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(candidates):
            raise InvalidArgumentError(f"k must be an int in [0, {len(candidates)}] (removable blocks), got {k!r}")
        chosen = sorted(candidates, key=lambda b: (float(scores[b.name]), b.order))[:k]
    else:
        chosen = [b for b in candidates if float(scores[b.name]) < threshold]
    return tuple(sorted(chosen, key=lambda b: b.order))


def make_block_plan(blocks: Blocks, names: Iterable[str], *, replacement: str = "identity") -> BlockPlan:
    """A plan removing the named blocks with ``replacement``.

    Raises:
        InvalidArgumentError: unknown names, or a block ``replacement`` cannot remove (a
            downsampling block has no identity; a branch with glue ops has no proxy).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", pretrained=False)
        >>> blocks = find_blocks(model, torch.randn(1, 3, 64, 64))
        >>> make_block_plan(blocks, ["layer1.1"]).edits[0].children
        ('conv1', 'bn1', 'act1', 'conv2', 'bn2')
    """
    if replacement not in REPLACEMENTS:
        raise InvalidArgumentError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
    edits = []
    for name in dict.fromkeys(names):
        try:
            block = blocks.by_name(name)
        except KeyError as error:
            raise InvalidArgumentError(str(error.args[0])) from None
        if replacement == "identity" and not block.removable:
            why = "it changes shape" if block.kind == "projection" else "zeroing its branch is not exact"
            raise InvalidArgumentError(f"block {name!r} cannot be replaced by the identity ({why}); "
                                       "use replacement='proxy'")
        if replacement == "proxy" and not block.proxy:
            raise InvalidArgumentError(f"block {name!r} has no proxy (only 4-D convolutional branches without "
                                       "glue ops in the block module do)")
        spec = block.proxy_spec() if replacement == "proxy" else None
        edits.append(BlockEdit(block.name, block.module, block.children, replacement,
                               (spec["in_channels"], spec["out_channels"], spec["stride"]) if spec else None))
    return BlockPlan(tuple(sorted(edits, key=lambda e: blocks.by_name(e.block).order)))
