"""graphprune.latency: the op table's cache keys, the per-layer model, the budgeted selection,
and ``prune(..., latency_reduction=...)``.

Most tests run on a closed-form fake timer (milliseconds proportional to an op's MACs), so they
are exact and do not depend on the load of the machine; the end-to-end timing test is ``slow``.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.latency import (LatencyConfig, LatencyModel, LatencyTable, OpSpec, plan_for_latency,
                                select_for_latency, width_grid)


class CountingTimer:
    """Fake timer: milliseconds = 1e-6 * MACs of the op (norms: elements); counts its calls."""

    def __init__(self, bump: dict[int, float] | None = None):
        self.calls = 0
        self.bump = bump or {}  # out width -> extra ms (a width slower than it should be)

    def __call__(self, spec: OpSpec, threads: int) -> float:
        self.calls += 1
        return closed_form_ms(spec) + self.bump.get(spec.out_width, 0.0)


def closed_form_ms(spec: OpSpec) -> float:
    n = spec.batch * math.prod(spec.spatial)
    if spec.kind == "conv2d":
        return 1e-6 * n * spec.out_width * (spec.in_width // spec.groups) * math.prod(spec.kernel)
    if spec.kind == "linear":
        return 1e-6 * n * spec.in_width * spec.out_width
    return 1e-6 * n * spec.in_width


def _spec(**changes) -> OpSpec:
    fields = dict(kind="conv2d", in_width=16, out_width=32, batch=1, spatial=(8, 8), kernel=(3, 3),
                  stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    fields.update(changes)
    return OpSpec(**fields)


# ---------------------------------------------------------------- table and cache


def test_cache_keys_differ_by_dtype_batch_and_threads(tmp_path) -> None:
    path = tmp_path / "latency.json"
    timer = CountingTimer()
    table = LatencyTable(path, threads=1, timer=timer)
    base = _spec()
    table.latency_ms(base)
    table.latency_ms(base)
    assert timer.calls == 1  # the second lookup is a hit
    table.latency_ms(_spec(dtype="torch.float64"))
    table.latency_ms(_spec(batch=16))
    table.latency_ms(_spec(in_width=8))
    assert timer.calls == 4
    table.save()
    assert not [p for p in tmp_path.iterdir() if p.name != "latency.json"]  # no temporary file left
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 4

    reloaded = LatencyTable(path, threads=1, timer=timer)
    for spec in (base, _spec(dtype="torch.float64"), _spec(batch=16), _spec(in_width=8)):
        reloaded.latency_ms(spec)
    assert (timer.calls, reloaded.timed) == (4, 0)  # every lookup came from the file

    other_threads = LatencyTable(path, threads=2, timer=timer)
    other_threads.latency_ms(base)
    assert (timer.calls, other_threads.timed) == (5, 1)


def test_cache_merges_entries_of_two_tables_and_ignores_a_damaged_file(tmp_path) -> None:
    path = tmp_path / "latency.json"
    a, b = LatencyTable(path, threads=1, timer=CountingTimer()), LatencyTable(path, threads=1, timer=CountingTimer())
    a.latency_ms(_spec(out_width=8))
    b.latency_ms(_spec(out_width=16))
    a.save()
    b.save()
    assert len(json.loads(path.read_text())["entries"]) == 2
    path.write_text("{not json")
    timer = CountingTimer()
    LatencyTable(path, threads=1, timer=timer).latency_ms(_spec(out_width=8))
    assert timer.calls == 1


def test_real_timer_times_each_kind_once() -> None:
    table = LatencyTable(path=False, threads=1, min_run_time=0.001)
    specs = [_spec(), OpSpec("linear", 32, 16, batch=2, spatial=(5,)), OpSpec("batch_norm", 8, 8, 1, (4, 4)),
             OpSpec("layer_norm", 8, 8, 1, (5,)), _spec(in_width=16, out_width=16, groups=16)]
    times = [table.latency_ms(s) for s in specs]
    assert all(0 < t < 1e3 for t in times) and table.timed == len(specs)


def test_bad_spec_is_refused() -> None:
    with pytest.raises(gp.InvalidArgumentError, match="unknown op kind"):
        OpSpec("pool", 1, 1, 1)
    with pytest.raises(gp.InvalidArgumentError):
        OpSpec("linear", 0, 1, 1)


# ---------------------------------------------------------------- the latency model


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.c2, self.b2 = nn.Conv2d(64, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(self.dw(x).mean((2, 3)))


def _model(batch_size: int = 1, timer=None, grid_points: int = 8):
    net = ConvNet().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = gp.trace(net, x)
    groups = gp.find_groups(graph)  # fc: its outputs are the model's, so it keeps them
    table = LatencyTable(path=False, threads=1, timer=timer or CountingTimer())
    return net, x, groups, LatencyModel(net, graph, x, table, batch_size=batch_size, grid_points=grid_points)


def _keep(groups, sizes: dict[str, int]) -> np.ndarray:
    """Mask removing the first channels of each group named by its first member's module."""
    gone = np.zeros(groups.graph.frozen.size, dtype=bool)
    for module, keep in sizes.items():
        group = _group(groups, module)
        gone[group.classes[: group.size - keep]] = True
    return gone


def _group(groups, module: str):
    """The group whose channels ``module`` produces."""
    return next(g for g in groups if any(m.module == module and m.role == "out" for m in g.members))


def test_predicted_latency_is_the_closed_form_at_grid_widths() -> None:
    _, _, groups, lm = _model(batch_size=4)
    assert [layer.spec.kind for layer in lm.layers] == ["conv2d", "batch_norm", "conv2d", "batch_norm", "conv2d",
                                                        "linear"]
    assert lm.layers[0].spec.batch == 4
    for k1, k2 in [(64, 48), (32, 48), (16, 16), (48, 32)]:
        gone = _keep(groups, {"c1": k1, "c2": k2})
        n = 4 * 64  # batch 4, 8x8 pixels
        expected = 1e-6 * n * (9 * 3 * k1 + k1 + 9 * k1 * k2 + k2 + 9 * k2) + 1e-6 * 4 * k2 * 10
        assert lm.predict_ms(gone) == pytest.approx(expected, rel=1e-9)


def test_predicted_latency_is_monotone_in_width() -> None:
    _, _, groups, lm = _model()
    for name in ("c1", "c2"):
        size = 64 if name == "c1" else 48
        times = [lm.predict_ms(_keep(groups, {name: k})) for k in range(size, 0, -1)]
        assert all(a >= b for a, b in zip(times, times[1:])), name
        assert times[0] > times[-1]


def test_building_the_model_times_each_shape_once() -> None:
    timer = CountingTimer()
    net, x, groups, lm = _model(timer=timer)
    first = timer.calls
    assert first == lm.table.timed > 0
    LatencyModel(net, groups.graph, x, lm.table)
    assert timer.calls == first  # the same table: every lookup a hit


def test_a_conv_padding_in_its_own_forward_is_timed_at_the_padded_size() -> None:
    """timm's Conv2dSame pads inside forward (padding=0 on the module): timing it on the unpadded
    input would model the wrong cost, and a 5x5 kernel on a 4x4 map cannot run at all."""
    from timm.layers import Conv2dSame

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Conv2dSame(16, 16, 5, stride=2, groups=16),
                        nn.ReLU(), nn.Conv2d(16, 8, 1))
    x = torch.randn(1, 3, 4, 4)
    graph = gp.trace(net, x)
    lm = LatencyModel(net, graph, x, LatencyTable(path=False, threads=1))  # the real timer: it must run
    spec = next(layer.spec for layer in lm.layers if layer.name == "2")
    assert spec.spatial == (7, 7) and spec.padding == (0, 0) and net[2](torch.randn(1, 16, 4, 4)).shape[-1] == 2
    assert lm.predict_ms() > 0


# ---------------------------------------------------------------- selection under a budget


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5, 0.3])
def test_selection_meets_the_budget_exactly_on_the_fake_table(fraction: float) -> None:
    net, _, groups, lm = _model()
    scores = gp.get_scorer("l1")(groups, net)
    full = lm.predict_ms()
    chosen, ms = select_for_latency(groups, scores, lm, fraction * full)
    assert ms <= fraction * full
    assert ms == pytest.approx(lm.predict_ms(_gone(groups, chosen)))
    for gid, channels in chosen.items():
        assert (groups.by_id(gid).size - len(channels)) % 8 == 0  # widths on the vector grid
        kept_scores = np.delete(scores[gid].numpy(), channels)
        assert scores[gid].numpy()[list(channels)].max() <= kept_scores.min()  # lowest scores go first


def test_selection_skips_a_width_the_table_shows_slower() -> None:
    bump = {40: 1.0}  # c1 at 40 output channels measured slower than at 48 (and 32)
    net, _, groups, lm = _model(timer=CountingTimer(bump))
    assert 40 in lm.layers[0].grids[1][0]
    scores = {g.id: torch.ones(g.size) for g in groups}
    for fraction in np.linspace(0.95, 0.3, 14):
        chosen, _ = select_for_latency(groups, scores, lm, fraction * lm.predict_ms())
        c1 = _group(groups, "c1")
        assert c1.size - len(chosen.get(c1.id, ())) != 40


def test_an_unreachable_budget_stops_at_the_caps() -> None:
    net, _, groups, lm = _model()
    chosen, ms = select_for_latency(groups, gp.get_scorer("l1")(groups, net), lm, 0.0)
    assert 0 < ms < lm.predict_ms()
    assert all(groups.by_id(g).size - len(c) >= 1 for g, c in chosen.items())


def _gone(groups, chosen) -> np.ndarray:
    gone = np.zeros(groups.graph.frozen.size, dtype=bool)
    for gid, channels in chosen.items():
        gone[groups.by_id(gid).classes[list(channels)]] = True
    return gone


def test_width_grid() -> None:
    assert width_grid(64, points=8) == (8, 16, 24, 32, 40, 48, 56, 64)
    assert width_grid(100, points=4) == (32, 64, 96, 100)
    assert width_grid(96, unit=48) == (48, 96)


# ---------------------------------------------------------------- measured refinement



def test_plan_for_latency_records_every_try() -> None:
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    x = torch.randn(64, 256)
    groups = gp.find_groups(gp.trace(net, x))
    config = LatencyConfig(cache=False, threads=1, max_steps=2, repeats=5, tolerance=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a loaded machine may miss even 50 points
        plan, record = plan_for_latency(net, groups, gp.get_scorer("l1")(groups, net), [(x,)], 0.3, latency=config)
    assert record.steps[0][0] == 0.3 and 1 <= len(record.steps) <= 2
    assert record.timings > 0 and record.base_ms > 0 and record.pruned_ms > 0
    assert record.measured == pytest.approx(1 - record.pruned_ms / record.base_ms)
    assert record.reached == (abs(record.measured - 0.3) <= 0.5)
    assert (record.predicted, record.measured) in [(p, m) for _, p, m in record.steps]
    assert plan.removed and net[0].out_features == 512  # the model itself is untouched


def test_refresh_retimes_cached_entries_once(tmp_path) -> None:
    spec, path = OpSpec("linear", 64, 32, batch=1), tmp_path / "latency.json"
    first = LatencyTable(path, threads=1, timer=lambda s, t: 1000.0)
    first.latency_ms(spec)
    first.save()
    cached = LatencyTable(path, threads=1, timer=lambda s, t: 1.0)
    assert cached.latency_ms(spec) == 1000.0 and (cached.hits, cached.timed) == (1, 0)
    fresh = LatencyTable(path, threads=1, timer=lambda s, t: 1.0, refresh=True)
    assert [fresh.latency_ms(spec), fresh.latency_ms(spec)] == [1.0, 1.0] and (fresh.hits, fresh.timed) == (0, 1)
    fresh.save()
    assert LatencyTable(path, threads=1).latency_ms(spec) == 1.0  # the new timing replaced the stale one


def test_stale_cached_timings_are_retimed(tmp_path) -> None:
    """A cache recorded under another load (here: every op 1000 ms) would steer the selection by
    timings this machine does not reproduce; the modelled layers then exceed the whole measured
    model, and the table is timed again (by a fake timer far below any real time, so the check
    does not depend on the load). A cache that agrees with the machine is trusted."""
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    x = torch.randn(64, 256)
    groups = gp.find_groups(gp.trace(net, x))
    scores = gp.get_scorer("l1")(groups, net)
    config = LatencyConfig(cache=tmp_path / "latency.json", threads=1, max_steps=1, repeats=5, tolerance=0.9)

    def run(**options):
        return plan_for_latency(net, groups, scores, [(x,)], 0.3, latency=LatencyConfig(**{**config.__dict__,
                                                                                           **options}))[1]

    stale = run(timer=lambda spec, threads: 1000.0)  # written to the file
    assert stale.timings > 0 and stale.modelled_ms > 100 * stale.base_ms
    fresh = lambda spec, threads: 1e-6 * closed_form_ms(spec)  # noqa: E731 - far below any real time
    retimed = run(timer=fresh)
    assert retimed.timings > 0 and retimed.modelled_ms < retimed.base_ms
    trusted = run(timer=fresh)
    assert trusted.timings == 0 and trusted.modelled_ms == retimed.modelled_ms


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), True, "0.3"])
def test_bad_latency_reduction_is_refused(bad) -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(gp.InvalidArgumentError, match="latency_reduction"):
        gp.prune(net, torch.randn(1, 8), latency_reduction=bad)


def test_latency_reduction_with_another_target_is_refused() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(gp.InvalidArgumentError, match="exactly one"):
        gp.prune(net, torch.randn(1, 8), ratio=0.3, latency_reduction=0.3)
    with pytest.raises(gp.InvalidArgumentError, match="exactly one"):
        gp.prune(net, torch.randn(1, 8), flops_reduction=0.3, latency_reduction=0.3)


def test_bad_latency_config_is_refused() -> None:
    with pytest.raises(gp.InvalidArgumentError, match="batch_size"):
        LatencyConfig(batch_size=0)
    with pytest.raises(gp.InvalidArgumentError, match="tolerance"):
        LatencyConfig(tolerance=0)


@pytest.mark.slow
def test_prune_to_a_measured_latency_reduction() -> None:
    """On a loaded machine timings drift; the tolerance here is 5 points, the default is 2."""
    net = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
    x = torch.randn(32, 512)
    config = LatencyConfig(cache=False, threads=1, tolerance=0.05, repeats=30)
    small = gp.prune(net, x, latency_reduction=0.4, latency_config=config)
    record = small.graphprune_latency
    assert abs(record["measured"] - 0.4) <= 0.05, record
    assert small(x).shape == (32, 512)


def test_cli_latency_reduction_plans_measures_and_records(tmp_path, monkeypatch) -> None:
    import timm

    from graphprune.cli import build_parser
    from graphprune.cli_commands import Progress, prune_in_stages

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    args = build_parser().parse_args(["prune", "test_resnet", "-o", str(tmp_path / "out"),
                                      "--latency-reduction", "0.3"])
    model = timm.create_model("test_resnet")
    params = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a loaded machine may miss the 2 points
        pruned = prune_in_stages(model, torch.randn(1, 3, 32, 32), args, Progress(enabled=False))
    record = pruned.graphprune_latency
    assert record["target"] == 0.3 and record["timings"] > 0 and 1 <= len(record["steps"]) <= 6
    assert sum(p.numel() for p in pruned.parameters()) < params and pruned.graphprune_plans
    assert (tmp_path / "latency.json").is_file()
    from graphprune.cli import _UsageError

    with pytest.raises(_UsageError, match="not allowed with argument --ratio"):  # one target only
        build_parser().parse_args(["prune", "test_resnet", "-o", "x", "--ratio", "0.3", "--latency-reduction", "0.3"])
