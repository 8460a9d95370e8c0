"""MkDocs hook: render the benchmark tables from the committed CSVs at build time.

A page marks where a table goes with an HTML comment, ``<!-- gen:coverage-summary -->``;
the hook replaces it with markdown computed from ``benchmarks/results/coverage.csv`` (markers
named ``transfer-*`` read ``benchmarks/results/transfer.csv``). So every number on the
benchmarks page is a CSV cell or a count/median/mean over CSV rows, and rerunning the
benchmark updates the page with no edit. ``tests/test_docs.py`` checks the summary against
``coverage_summary.txt``, written by ``benchmarks/coverage.py`` from the same rows.
"""

from __future__ import annotations

import csv
import re
import statistics
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COVERAGE_CSV = ROOT / "benchmarks" / "results" / "coverage.csv"
TRANSFER_CSV = ROOT / "benchmarks" / "results" / "transfer.csv"
TRANSFER_TASKS = ("flowers17", "cub100", "gtsrb")  # table order
TOOLS = ("graphprune", "torch_pruning")
_MARKER = re.compile(r"<!-- gen:([\w-]+) -->")


def read_rows(path: Path = COVERAGE_CSV) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def macs_kept(row: dict[str, str]) -> float | None:
    """``macs_after / macs_before`` of one row (None when either is missing)."""
    before, after = _num(row.get("macs_before")), _num(row.get("macs_after"))
    return after / before if before and after else None


def summary(rows: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Per tool, as ``benchmarks/coverage.py``'s ``summarize`` computes it.

    Keys: ``models``, ``ok``, ``exact``, ``judged`` (rows with exact yes/no), ``graph_s``,
    ``prune_s``, ``total_s`` (medians over ok rows), ``total_s_both`` (median over the
    models both tools prune), ``macs_kept`` (median of macs_after / macs_before, ok rows).
    """
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    both = [m for m, t in by_model.items() if all(t.get(x, {}).get("status") == "ok" for x in TOOLS)]
    out = {}
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool]
        ok = [r for r in mine if r["status"] == "ok"]
        judged = [r for r in mine if r["exact"] in ("yes", "no")]

        def med(key: str, subset: list[dict[str, str]]) -> float:
            values = [v for v in (_num(r.get(key)) for r in subset) if v is not None]
            return statistics.median(values) if values else float("nan")

        kept = [k for k in map(macs_kept, ok) if k is not None]
        out[tool] = {"models": len(mine), "ok": len(ok), "exact": sum(r["exact"] == "yes" for r in judged),
                     "judged": len(judged), "graph_s": med("graph_s", ok), "prune_s": med("prune_s", ok),
                     "total_s": med("total_s", ok), "total_s_both": med("total_s", [by_model[m][tool] for m in both]),
                     "macs_kept": statistics.median(kept) if kept else float("nan"), "both_ok": len(both)}
    return out


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def render_summary(rows: list[dict[str, str]]) -> str:
    stats = summary(rows)
    body = [[f"`{tool}`", f"{s['ok']}/{s['models']}", f"{s['exact']}/{s['judged']}", f"{s['graph_s']:.2f}",
             f"{s['prune_s']:.2f}", f"{s['total_s']:.2f}", f"{s['total_s_both']:.2f}", f"{s['macs_kept']:.3f}"]
            for tool, s in stats.items()]
    both = stats[TOOLS[0]]["both_ok"]
    return (f"Both tools prune {both} of the {stats[TOOLS[0]]['models']} models.\n\n"
            + _table(["tool", "ok", "exact / judged", "median graph_s", "median prune_s", "median total_s",
                      f"median total_s ({both} models both ok)", "median MACs kept"], body))


def _cell(row: dict[str, str] | None) -> list[str]:
    if row is None:
        return ["", "", "", ""]
    kept = macs_kept(row)
    return [row["status"], row["exact"] or "–", "" if kept is None else f"{kept:.3f}", row["total_s"]]


def render_models(rows: list[dict[str, str]]) -> str:
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    body = [[f"`{model}`", *_cell(tools.get(TOOLS[0])), *_cell(tools.get(TOOLS[1]))]
            for model, tools in by_model.items()]
    header = ["model"] + [f"{t} {c}" for t in ("gp", "tp") for c in ("status", "exact", "MACs kept", "total_s")]
    return _table(header, body)


def render_failures(rows: list[dict[str, str]]) -> str:
    body = [[f"`{r['model']}`", r["tool"], r["status"], r["exact"] or "–",
             (r["error"] or r["exact_error"])[:90], r["notes"].strip("; ")[:90]]
            for r in rows if r["status"] != "ok" or r["exact"] == "no"]
    return _table(["model", "tool", "status", "exact", "error (first 90 characters)", "notes"], body)


def render_environment(rows: list[dict[str, str]]) -> str:
    keys = ("torch", "timm", "torch_pruning", "graphprune", "python", "cpu", "threads", "jobs", "ratio", "seed", "date")
    body = [[f"`{k}`", ", ".join(sorted({r[k] for r in rows if r[k]}))] for k in keys]
    return _table(["column", "values in the CSV"], body)


def transfer_means(rows: list[dict[str, str]]) -> list[dict]:
    """Mean and sample std over seeds per (task, recipe, variant, budget), as ``benchmarks/transfer.py`` reports.

    Rows without a test accuracy (a variant that failed) are counted in ``failed``.
    """
    tasks = sorted(dict.fromkeys(r["task"] for r in rows), key=lambda t: (TRANSFER_TASKS + (t,)).index(t))
    keys = list(dict.fromkeys((r["task"], r["recipe"], r["variant"], r["budget"]) for r in rows))
    keys.sort(key=lambda key: tasks.index(key[0]))  # stable: run order within a task
    out = []
    for key in keys:
        mine = [r for r in rows if (r["task"], r["recipe"], r["variant"], r["budget"]) == key]
        ok = [r for r in mine if _num(r["test_accuracy"]) is not None]
        entry = {"task": key[0], "recipe": key[1], "variant": key[2], "budget": float(key[3]), "seeds": len(ok),
                 "failed": len(mine) - len(ok), "toolkit": mine[0]["toolkit"],
                 "error": next((r["error"] for r in mine if _num(r["test_accuracy"]) is None), "")}
        for name in ("test_accuracy", "flops_reduction", "macs", "params"):
            values = [float(r[name]) for r in ok]
            entry[name] = statistics.mean(values) if values else float("nan")
            entry[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def render_transfer(rows: list[dict[str, str]]) -> str:
    body = []
    for e in transfer_means(rows):
        if e["seeds"]:
            cells = [f"{e['test_accuracy']:.3f} ± {e['test_accuracy_std']:.3f}", str(e["seeds"]),
                     f"{e['flops_reduction']:.3f}", f"{e['macs'] / 1e6:.1f}", f"{e['params'] / 1e6:.3f}"]
        else:
            cells = ["failed: " + e["error"][:70], "0", "", "", ""]
        budget = f"{e['budget']:.0%}" if e["budget"] else "–"
        body.append([e["task"], e["recipe"], e["variant"], e["toolkit"], budget, *cells])
    return _table(["task", "recipe", "variant", "toolkit", "budget", "test accuracy (mean ± std)", "seeds",
                   "measured reduction", "MACs (M)", "params (M)"], body)


def render_transfer_setup(rows: list[dict[str, str]]) -> str:
    keys = ("image_size", "train_images", "test_images", "source_epochs", "target_epochs")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    body = [[task, *[", ".join(sorted({r[k] for r in rows if r["task"] == task})) for k in keys],
             ", ".join(sorted({r["seed"] for r in rows if r["task"] == task}))] for task in tasks]
    return _table(["task", *keys, "seeds"], body)


def render_transfer_environment(rows: list[dict[str, str]]) -> str:
    keys = ("torch", "timm", "torch_pruning", "graphprune", "python", "cpu", "threads", "device")
    body = [[f"`{k}`", ", ".join(sorted({r[k] for r in rows if r[k]}))] for k in keys]
    dates = sorted(r["date"] for r in rows if r["date"])
    body.append(["`date` (first, last)", f"{dates[0]}, {dates[-1]}" if dates else ""])
    return _table(["column", "values in the CSV"], body)


RENDERERS: dict[str, Callable[[list[dict[str, str]]], str]] = {
    "coverage-summary": render_summary,
    "coverage-models": render_models,
    "coverage-failures": render_failures,
    "coverage-environment": render_environment,
    "transfer-table": render_transfer,
    "transfer-setup": render_transfer_setup,
    "transfer-environment": render_transfer_environment,
}


def render(markdown: str, rows: list[dict[str, str]] | None = None) -> str:
    """Replace every ``<!-- gen:NAME -->`` marker; unknown names raise with the known ones.

    ``rows`` stands in for the coverage CSV; ``transfer-*`` markers always read ``TRANSFER_CSV``.
    """
    if not _MARKER.search(markdown):
        return markdown
    sources: dict[str, list[dict[str, str]]] = {}

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in RENDERERS:
            raise KeyError(f"unknown docs marker gen:{name}; known: {sorted(RENDERERS)}")
        source = "transfer" if name.startswith("transfer-") else "coverage"
        if source not in sources:
            given = rows if source == "coverage" else None
            sources[source] = given if given is not None else read_rows(
                TRANSFER_CSV if source == "transfer" else COVERAGE_CSV)
        return RENDERERS[name](sources[source])

    return _MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs hook
    return render(markdown)
