"""Channel elements: the atoms of coupling.

Every channel index of every traced tensor dimension and of every parameter dimension
carries an *element* id. Coupling rules never mutate tensors; they only record facts
about elements:

* ``union(a, b)``: element ``a[i]`` and ``b[i]`` must be removed together;
* ``freeze(a)``: these elements may never be removed;
* ``link(composite, factors)``: a reshape merged or split channel dimensions, so a
  composite index ``i`` is the product of ``factors[f][i]``; one factor is chosen as the
  pruning unit when the trace is complete (:func:`resolve`).

After the trace, connected components of the union graph are *classes*: a class is one
removable channel. Ids are plain ``int64`` numpy arrays; ``-1`` marks a constant slot
(e.g. zero padding) that has no element and can never be removed.

Example:
    >>> store = ElementStore()
    >>> a, b = store.new(3), store.new(3)
    >>> store.union(a, b)
    >>> classes = store.resolve()
    >>> bool((classes[a] == classes[b]).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ._runtime import sorted_unique

SLOT = -1  # an index that carries no element: a constant (padding) channel


@dataclass(frozen=True)
class TensorInfo:
    """Per-dimension element ids of one traced tensor.

    Attributes:
        dims: one entry per tensor dimension: an ``int64`` array with one element id per
            index (``SLOT`` for constant indices), or ``None`` for a dimension that is not a
            channel dimension (batch, spatial, tokens) and never changes size.
    """

    dims: tuple[np.ndarray | None, ...]

    @staticmethod
    def free(ndim: int) -> TensorInfo:
        """Info of a tensor with no channel dimension.

        Example:
            >>> TensorInfo.free(2).dims
            (None, None)
        """
        return TensorInfo((None,) * ndim)

    @property
    def has_channels(self) -> bool:
        """Whether any dimension carries elements."""
        return any(d is not None for d in self.dims)


@dataclass
class Link:
    """A merge or split of channel dimensions (see module docstring)."""

    composite: np.ndarray
    factors: list[np.ndarray]
    op: str
    where: str = ""


def _elements(ids: np.ndarray | None) -> np.ndarray:
    """The element ids in ``ids`` (any shape, ``None`` for none), flat, slots left out."""
    if ids is None:
        return np.zeros(0, np.int64)
    ids = np.asarray(ids, dtype=np.int64).ravel()
    return ids[ids >= 0]


def _mark(marks: list[np.ndarray], ids: np.ndarray | None) -> bool:
    """Append the elements of ``ids`` to ``marks``; whether there were any."""
    ids = _elements(ids)
    if ids.size:
        marks.append(ids)
    return bool(ids.size)


@dataclass
class ElementStore:
    """Allocates element ids and records unions, freezes, links, head marks and parameter roles."""

    size: int = 0
    _pairs_a: list[np.ndarray] = field(default_factory=list)
    _pairs_b: list[np.ndarray] = field(default_factory=list)
    _frozen: list[np.ndarray] = field(default_factory=list)
    _heads: list[np.ndarray] = field(default_factory=list)
    _stats: list[np.ndarray] = field(default_factory=list)
    _frozen_why: list[str] = field(default_factory=list)
    _roles: dict[int, str] = field(default_factory=dict)  # first element of a parameter dim -> its role
    current: str = ""  # what is being traced now; recorded with every freeze
    links: list[Link] = field(default_factory=list)

    def new(self, n: int) -> np.ndarray:
        """Allocate ``n`` fresh element ids."""
        ids = np.arange(self.size, self.size + n, dtype=np.int64)
        self.size += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple ``a[i]`` with ``b[i]``; an index that is a slot on one side freezes the other."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            raise ValueError(f"union of arrays with shapes {a.shape} and {b.shape}")
        both = (a >= 0) & (b >= 0)
        if both.all():  # the common case: no slot on either side
            self._pairs_a.append(a)
            self._pairs_b.append(b)
            return
        self._pairs_a.append(a[both])
        self._pairs_b.append(b[both])
        self.freeze(a[(b == SLOT) & (a >= 0)])
        self.freeze(b[(a == SLOT) & (b >= 0)])

    def union_all(self, ids: np.ndarray) -> None:
        """Couple every element of ``ids`` with every other."""
        ids = _elements(ids)
        if ids.size > 1:
            self._pairs_a.append(np.full(ids.size - 1, ids[0]))
            self._pairs_b.append(ids[1:])

    def union_rows(self, rows: np.ndarray) -> None:
        """Couple all elements within each row of a 2-d array (slots, ``-1``, are skipped)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] < 2:
            return
        first = np.where(rows >= 0, rows, np.int64(-1)).max(axis=1, keepdims=True)
        first = np.broadcast_to(first, rows.shape)
        keep = (rows >= 0) & (first >= 0)
        self._pairs_a.append(first[keep])
        self._pairs_b.append(rows[keep])

    def freeze(self, ids: np.ndarray | None) -> None:
        """Mark elements as never removable."""
        if _mark(self._frozen, ids):
            self._frozen_why.append(self.current)

    def mark_heads(self, ids: np.ndarray | None) -> None:
        """Mark elements that index attention heads (batch dims of an attention product)."""
        _mark(self._heads, ids)

    def mark_statistic(self, ids: np.ndarray | None) -> None:
        """Mark elements of a dim that a statistic is taken over (layer norm, mean, softmax).

        Removing such a channel is structurally fine but changes the statistic, so pruning
        channels that were zeroed beforehand is not exactly output-preserving there.
        """
        _mark(self._stats, ids)

    def mark_role(self, ids: np.ndarray | None, role: str) -> None:
        """Record that the parameter dim ``ids`` produces (``"out"``) or consumes (``"in"``) its channels.

        Only rules that know better than the default (dim 1 of a 2-d+ weight consumes, every
        other dim produces) mark roles, e.g. an ``(in, out)`` weight in ``addmm``.
        """
        if ids is not None and np.size(ids):
            self._roles[int(np.asarray(ids).ravel()[0])] = role

    def role_of(self, ids: np.ndarray) -> str | None:
        """The role recorded for the parameter dim ``ids`` (see :meth:`mark_role`), or ``None``.

        Example:
            >>> store = ElementStore()
            >>> w = store.new(4)
            >>> store.mark_role(w, "in")
            >>> store.role_of(w), store.role_of(store.new(2))
            ('in', None)
        """
        return self._roles.get(int(ids[0])) if self._roles and ids.size else None

    def statistic_classes(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask over classes: True where some statistic is taken over the class."""
        return self._class_mask(labels, self._stats)

    def link(self, composite: np.ndarray, factors: list[np.ndarray], op: str) -> None:
        """Record that ``composite[i]`` is the product of ``factors[f][i]``."""
        self.links.append(Link(np.asarray(composite), [np.asarray(f) for f in factors], op, self.current))

    def _components(self) -> np.ndarray:
        a = np.concatenate(self._pairs_a) if self._pairs_a else np.zeros(0, np.int64)
        b = np.concatenate(self._pairs_b) if self._pairs_b else np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(self.size, self.size))
        _, labels = connected_components(graph, directed=False)
        return labels.astype(np.int64)

    def _class_mask(self, labels: np.ndarray, marked: list[np.ndarray]) -> np.ndarray:
        mask = np.zeros(labels.max() + 1 if labels.size else 0, dtype=bool)
        if marked:
            mask[labels[np.concatenate(marked)]] = True
        return mask

    def resolve(self) -> np.ndarray:
        """Choose a pruning unit for every link and return the class of every element.

        A link keeps one factor as the unit: a factor that indexes attention heads if
        there is one, else the innermost factor that is not frozen. The other factors are
        frozen and every composite index is coupled to its unit element. This repeats until
        no choice changes, since each choice can freeze or merge classes others depend on.

        Returns:
            ``labels[element] -> class`` (int64 array of length ``self.size``).
        """
        decided: dict[int, int] = {}
        while True:
            labels = self._components()
            frozen = self._class_mask(labels, self._frozen)
            heads = self._class_mask(labels, self._heads)
            changed = False
            for index, link in enumerate(self.links):
                owner = _choose_owner(link, labels, frozen, heads)
                self.current = f"not the pruning unit of a {link.op} at {link.where}"
                if decided.get(index) == owner:
                    continue
                changed = True
                decided[index] = owner
                for f, factor in enumerate(link.factors):
                    if f == owner:
                        self.union(link.composite, factor)
                    else:
                        self.freeze(factor)
                if owner < 0:
                    self.freeze(link.composite)
            if not changed:
                return labels

    def frozen_reasons(self, labels: np.ndarray) -> dict[int, str]:
        """For every frozen class, the first recorded reason (the op and module that froze it)."""
        reasons: dict[int, str] = {}
        for ids, why in zip(self._frozen, self._frozen_why):
            for c in sorted_unique(labels[ids]):
                reasons.setdefault(int(c), why)
        return reasons

    def frozen_classes(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask over classes: True where the class contains a frozen element."""
        return self._class_mask(labels, self._frozen)


def _choose_owner(link: Link, labels: np.ndarray, frozen: np.ndarray, heads: np.ndarray) -> int:
    """Index of the factor that becomes the pruning unit of ``link``, or -1 for none."""
    candidates = []
    for f, factor in enumerate(link.factors):
        ids = factor[factor >= 0]
        if ids.size == 0 or ids.min() == ids.max() or frozen[labels[ids]].any():
            continue
        # how often the factor changes along the composite index: innermost changes most
        changes = int(np.count_nonzero(np.diff(factor)))
        candidates.append((bool(heads[labels[ids]].any()), changes, f))
    if not candidates:
        return -1
    return max(candidates)[2]
