"""Before/after comparison of two measurements, for the terminal, docs and JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphprune.measurement.measure import Measurement

__all__ = ["ComparisonRow", "ComparisonTable", "compare"]

_HEADER = ("metric", "before", "after", "change")


@dataclass(frozen=True)
class ComparisonRow:
    """One metric before and after.

    Attributes:
        metric: ``"params"``, ``"macs"`` or ``"latency_ms"``.
        before: Value before.
        after: Value after.
        before_p10_p90: Spread before, for latency; ``None`` otherwise.
        after_p10_p90: Spread after, for latency; ``None`` otherwise.
    """

    metric: str
    before: float
    after: float
    before_p10_p90: tuple[float, float] | None = None
    after_p10_p90: tuple[float, float] | None = None

    @property
    def reduction_pct(self) -> float | None:
        """``100 * (before - after) / before``; ``None`` when ``before`` is 0."""
        return 100.0 * (self.before - self.after) / self.before if self.before else None

    @property
    def speedup_x(self) -> float | None:
        """``before / after``; ``None`` when ``after`` is 0."""
        return self.before / self.after if self.after else None

    @property
    def is_latency(self) -> bool:
        """Latency rows report a speedup, the others a reduction."""
        return self.metric == "latency_ms"

    def cells(self) -> tuple[str, str, str, str]:
        """The row as display strings: metric, before, after, change.

        Returns:
            Four strings, e.g. ``("params", "11.69 M", "8.18 M", "-30.0%")``.

        Example:
            >>> ComparisonRow("macs", 2e9, 1.5e9).cells()
            ('MACs', '2.00 G', '1.50 G', '-25.0%')
        """
        if self.is_latency:
            change = "n/a" if self.speedup_x is None else f"{self.speedup_x:.2f}x"
            return (
                "latency",
                _format_latency(self.before, self.before_p10_p90),
                _format_latency(self.after, self.after_p10_p90),
                change,
            )
        change = "n/a" if self.reduction_pct is None else f"{-self.reduction_pct:+.1f}%"
        label = "MACs" if self.metric == "macs" else self.metric
        return (label, _format_count(self.before), _format_count(self.after), change)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the raw values and both ratios.

        Returns:
            ``metric, before, after, reduction_pct, speedup_x`` (+ spreads for latency).

        Example:
            >>> ComparisonRow("params", 100, 75).to_dict()["reduction_pct"]
            25.0
        """
        values: dict[str, Any] = {
            "metric": self.metric,
            "before": self.before,
            "after": self.after,
            "reduction_pct": self.reduction_pct,
            "speedup_x": self.speedup_x,
        }
        if self.is_latency:
            values["before_p10_p90"] = list(self.before_p10_p90) if self.before_p10_p90 else None
            values["after_p10_p90"] = list(self.after_p10_p90) if self.after_p10_p90 else None
        return values


def _format_count(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value:.0f}"


def _format_latency(median_ms: float, p10_p90: tuple[float, float] | None) -> str:
    if p10_p90 is None:
        return f"{median_ms:.2f} ms"
    return f"{median_ms:.2f} ms [{p10_p90[0]:.2f}-{p10_p90[1]:.2f}]"


@dataclass(frozen=True)
class ComparisonTable:
    """Rows params, MACs and (when both sides were timed) latency.

    ``change`` is the signed relative change for params and MACs (``-30.0%`` means
    30% fewer) and the speedup ``before / after`` for latency.

    Attributes:
        rows: One row per metric, in display order.
        batch_size: Batch size both latencies were measured at.
        threads: Thread count both latencies were measured with.
    """

    rows: tuple[ComparisonRow, ...]
    batch_size: int
    threads: int

    def row(self, metric: str) -> ComparisonRow:
        """The row for ``metric``; raises ``KeyError`` listing the known metrics.

        Args:
            metric: ``"params"``, ``"macs"`` or ``"latency_ms"``.

        Returns:
            The matching row.

        Example:
            >>> table = ComparisonTable((ComparisonRow("params", 4, 3),), 1, 1)
            >>> table.row("params").after
            3
        """
        for row in self.rows:
            if row.metric == metric:
                return row
        raise KeyError(f"no row {metric!r}; rows are {[r.metric for r in self.rows]}")

    def _footer(self) -> str:
        if not any(row.is_latency for row in self.rows):
            return "latency not measured"
        return (
            "latency: median [p10-p90] of timed runs, "
            f"batch {self.batch_size}, {self.threads} thread(s)"
        )

    def __str__(self) -> str:
        lines = [_HEADER, *(row.cells() for row in self.rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
        # Metric names align left, numbers right.
        formatted = [
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
            for line in lines
        ]
        rule = "-" * len(formatted[0])
        return "\n".join([formatted[0], rule, *formatted[1:], self._footer()])

    def to_markdown(self) -> str:
        """The table as GitHub Markdown, with the same cells as ``str(table)``.

        Returns:
            Markdown text ending with an italic footer line.

        Example:
            >>> print(ComparisonTable((ComparisonRow("params", 4e6, 3e6),), 1, 2).to_markdown())
            | metric | before | after | change |
            |:--|--:|--:|--:|
            | params | 4.00 M | 3.00 M | -25.0% |
            <BLANKLINE>
            _latency not measured_
        """
        lines = ["| " + " | ".join(_HEADER) + " |", "|:--|--:|--:|--:|"]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join([*lines, "", f"_{self._footer()}_"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Returns:
            ``{"batch_size", "threads", "rows": [row.to_dict(), ...]}``.

        Example:
            >>> table = ComparisonTable((ComparisonRow("macs", 8, 2),), 1, 1)
            >>> table.to_dict()["rows"][0]["speedup_x"]
            4.0
        """
        return {
            "batch_size": self.batch_size,
            "threads": self.threads,
            "rows": [row.to_dict() for row in self.rows],
        }


def compare(before: Measurement, after: Measurement) -> ComparisonTable:
    """Compares two measurements of (usually) a model before and after pruning.

    Latency is compared only when both sides were timed, and then only at the same
    batch size and thread count; anything else would be a different experiment.

    Args:
        before: Measurement of the reference model.
        after: Measurement of the changed model.

    Returns:
        The comparison table.

    Example:
        >>> a = Measurement(1000, 400, {}, {}, 10.0, 9.0, 11.0, 1, 2)
        >>> b = Measurement(700, 100, {}, {}, 4.0, 3.5, 4.5, 1, 2)
        >>> table = compare(a, b)
        >>> table.row("macs").reduction_pct, table.row("latency_ms").speedup_x
        (75.0, 2.5)
    """
    rows = [
        ComparisonRow("params", before.params, after.params),
        ComparisonRow("macs", before.macs, after.macs),
    ]
    timed = before.latency_ms_median is not None and after.latency_ms_median is not None
    if timed:
        if (before.batch_size, before.threads) != (after.batch_size, after.threads):
            raise ValueError(
                "latencies measured under different settings: "
                f"batch_size {before.batch_size} vs {after.batch_size}, "
                f"threads {before.threads} vs {after.threads}"
            )
        rows.append(
            ComparisonRow(
                "latency_ms",
                before.latency_ms_median,
                after.latency_ms_median,
                before_p10_p90=_spread(before),
                after_p10_p90=_spread(after),
            )
        )
    return ComparisonTable(rows=tuple(rows), batch_size=before.batch_size, threads=before.threads)


def _spread(measurement: Measurement) -> tuple[float, float] | None:
    if measurement.latency_ms_p10 is None or measurement.latency_ms_p90 is None:
        return None
    return (measurement.latency_ms_p10, measurement.latency_ms_p90)
