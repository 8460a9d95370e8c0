"""graphprune.measurement: closed-form MACs, FlopCounterMode agreement, latency, compare."""

from __future__ import annotations

import gc
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from graphprune.measurement import (
    ComparisonTable,
    Measurement,
    analyze_macs,
    compare,
    count_macs,
    measure,
    measure_latency,
)
from graphprune.measurement.flops import einsum_macs


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------- closed-form MACs


@pytest.mark.parametrize(
    "cin, cout, kernel, stride, padding, groups, height, width",
    [
        pytest.param(3, 16, 3, 1, 1, 1, 12, 10, id="dense"),
        pytest.param(8, 12, 3, 1, 0, 4, 9, 9, id="grouped"),
        pytest.param(8, 8, 5, 1, 2, 8, 10, 7, id="depthwise"),
        pytest.param(4, 6, 3, 2, 1, 1, 11, 16, id="strided"),
        pytest.param(6, 10, 1, 1, 0, 2, 5, 5, id="pointwise-grouped"),
    ],
)
def test_conv_macs_closed_form(
    cin: int,
    cout: int,
    kernel: int,
    stride: int,
    padding: int,
    groups: int,
    height: int,
    width: int,
) -> None:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups)
    batch = 2
    h_out, w_out = (
        _conv_out(height, kernel, stride, padding),
        _conv_out(width, kernel, stride, padding),
    )
    expected = batch * kernel * kernel * (cin // groups) * cout * h_out * w_out

    count = analyze_macs(conv, torch.randn(batch, cin, height, width))

    assert count.macs == expected
    assert count.flops == 2 * expected
    assert count.macs_by_family == {"conv": expected}  # bias and nothing else counted
    assert count.uncounted_ops == {}


def test_transposed_conv_counts_input_positions() -> None:
    conv = nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2)
    height, width = 5, 7
    # Every input element is scattered to (cout / groups) * k * k outputs.
    expected = 6 * height * width * (4 // 2) * 3 * 3
    assert count_macs(conv, torch.randn(1, 6, height, width)) == expected


@pytest.mark.parametrize("bias", [True, False])
def test_linear_macs_per_token(bias: bool) -> None:
    batch, tokens, cin, cout = 2, 7, 12, 5
    linear = nn.Linear(cin, cout, bias=bias)
    assert count_macs(linear, torch.randn(batch, tokens, cin)) == batch * tokens * cin * cout


class _Attention(nn.Module):
    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_macs_are_qk_plus_av(causal: bool) -> None:
    b, h, n_q, n_k, d, d_v = 2, 3, 5, 5 if causal else 7, 8, 6
    q, k, v = torch.randn(b, h, n_q, d), torch.randn(b, h, n_k, d), torch.randn(b, h, n_k, d_v)

    count = analyze_macs(_Attention(causal), (q, k, v))

    # Dense count even when causal, as FlopCounterMode does.
    assert count.macs == b * h * n_q * n_k * d + b * h * n_q * n_k * d_v
    assert count.macs_by_family == {"attention": count.macs}
    assert count.uncounted_ops == {}


class _Contractions(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # a (B, N, K), b (B, K, M)
        return (
            torch.einsum("bnk,bkm->bnm", a, b),  # B*N*K*M
            a[0] @ b,  # broadcast (N, K) @ (B, K, M): B*N*K*M
            torch.baddbmm(torch.zeros(1), a, b),  # B*N*K*M
        )


def test_matmul_family_with_broadcasting() -> None:
    batch, n, k, m = 3, 4, 5, 6
    count = analyze_macs(_Contractions(), (torch.randn(batch, n, k), torch.randn(batch, k, m)))
    assert count.macs_by_family == {"einsum": batch * n * k * m, "matmul": 2 * batch * n * k * m}


def test_einsum_macs_ellipsis_and_chains() -> None:
    # Batched attention scores written with an ellipsis: (B, H) * Nq * Nk * D.
    assert einsum_macs("...nd,...md->...nm", [(2, 3, 4, 8), (2, 3, 5, 8)]) == 2 * 3 * 4 * 5 * 8
    # Ellipsis broadcast against a lower-rank operand, upper-case subscripts allowed.
    assert einsum_macs("...ND,DM->...NM", [(2, 3, 4, 8), (8, 5)]) == 2 * 3 * 4 * 8 * 5
    # Three operands, contracted left to right: (ij,jk) then (ik,kl).
    assert einsum_macs("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]) == 2 * 3 * 4 + 2 * 4 * 5
    # A letter only in one operand is summed away first and does not multiply the cost.
    assert einsum_macs("ij,jk->k", [(9, 3), (3, 4)]) == 3 * 4
    assert einsum_macs("ii->i", [(4, 4)]) == 0


def test_unknown_ops_are_reported_not_guessed() -> None:
    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(x, 1) + torch.linalg.det(x)[:, None, None]

    count = analyze_macs(Odd(), torch.randn(2, 3, 3))
    assert count.macs == 0
    assert count.uncounted_ops == {"aten::cumprod": 1, "aten::linalg_det": 1}


class _TrainOnlyBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.extra = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        return self.extra(x) if self.training else x


def test_macs_are_counted_in_eval_mode_without_touching_the_model() -> None:
    model = _TrainOnlyBranch().train()
    running_mean = model.bn.running_mean.clone()

    count = analyze_macs(model, torch.randn(4, 8) + 3.0)

    assert count.macs == 0  # the train-only linear did not run
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)
    assert model.bn.num_batches_tracked.item() == 0


def test_macs_by_module_is_qualified_and_sums_to_total() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Sequential(nn.ReLU(), nn.Linear(4 * 6 * 6, 10))
    )
    count = analyze_macs(model, torch.randn(1, 3, 8, 8))

    conv_macs = 3 * 3 * 3 * 4 * 6 * 6
    linear_macs = 4 * 6 * 6 * 10
    assert count.macs_by_module["0"] == conv_macs
    assert count.macs_by_module["2.1"] == linear_macs
    assert count.macs_by_module["2"] == linear_macs
    assert count.macs_by_module[""] == count.macs == conv_macs + linear_macs


# ---------------------------------------------------------------- timm models vs FlopCounterMode

# (name, create kwargs, image side): small inputs where the architecture allows.
TIMM_MODELS = [
    ("vit_tiny_patch16_224", {"img_size": 96}, 96),
    ("deit_tiny_patch16_224", {"img_size": 96}, 96),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64),
    ("convnext_atto", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("resnet18", {}, 64),
    ("mobilenetv3_large_100", {}, 64),
    ("regnety_008", {}, 64),
    ("mixer_s16_224", {"img_size": 64}, 64),
    ("levit_128", {"img_size": 64}, 64),
]

# FlopCounterMode (2 flops per MAC) counts exactly these op classes; under the MATH
# SDPA backend attention is decomposed into bmm, so it lands in the matmul class.
FCM_CONV = {torch.ops.aten.convolution, torch.ops.aten._convolution}
FCM_MATMUL = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def _flop_counter_mode(model: nn.Module, x: torch.Tensor) -> dict[object, int]:
    # On CPU the fused SDPA kernel (_scaled_dot_product_flash_attention_for_cpu) has no
    # FlopCounterMode formula; the MATH backend makes it count attention as bmm.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return dict(counter.get_flop_counts()["Global"])


@pytest.mark.parametrize("name, kwargs, side", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_macs_agree_with_flop_counter_mode(name: str, kwargs: dict, side: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, side, side)

    count = analyze_macs(model, x)
    reference = _flop_counter_mode(model, x)

    assert set(reference) <= FCM_CONV | FCM_MATMUL, (
        f"FlopCounterMode counted new op classes: {reference}"
    )
    reference_conv = sum(v for op, v in reference.items() if op in FCM_CONV)
    reference_matmul = sum(v for op, v in reference.items() if op in FCM_MATMUL)
    ours_conv = 2 * count.macs_by_family.get("conv", 0)
    ours_matmul = 2 * sum(v for family, v in count.macs_by_family.items() if family != "conv")

    assert count.uncounted_ops == {}
    assert count.macs > 0
    assert math.isclose(2 * count.macs, reference_conv + reference_matmul, rel_tol=0.02)
    assert math.isclose(ours_conv, reference_conv, rel_tol=0.02, abs_tol=0)
    assert math.isclose(ours_matmul, reference_matmul, rel_tol=0.02, abs_tol=0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_attention_macs_closed_form(name: str) -> None:
    side, patch = 96, 16
    model = timm.create_model(name, pretrained=False, img_size=side).eval()
    depth, heads, dim = len(model.blocks), model.blocks[0].attn.num_heads, model.embed_dim
    tokens = (side // patch) ** 2 + 1  # + class token
    head_dim = dim // heads

    count = analyze_macs(model, torch.randn(1, 3, side, side))

    assert count.macs_by_family["attention"] == depth * heads * tokens * tokens * 2 * head_dim
    # Patch embedding is one strided conv: 3*16*16 inputs per output element.
    assert count.macs_by_family["conv"] == 3 * patch * patch * dim * (side // patch) ** 2


# ---------------------------------------------------------------- params and measure()


def test_params_equal_sum_of_numel_with_shared_weights_once() -> None:
    embed = nn.Embedding(11, 4)
    head = nn.Linear(4, 11, bias=True)
    head.weight = embed.weight  # tied
    model = nn.Sequential(embed, head)
    m = measure(model, torch.zeros(1, 3, dtype=torch.long), latency=False)
    assert m.params == 11 * 4 + 11
    assert m.params == sum(p.numel() for p in model.parameters())


class _Recorder(nn.Module):
    """Records what the forward pass saw, to check the timing protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.seen: list[tuple[int, int, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(
            (x.shape[0], torch.get_num_threads(), self.training, torch.is_inference_mode_enabled())
        )
        return self.bn(x)


def test_measure_fields_and_model_left_as_found() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    model.train()
    model[1].eval()  # mixed modes must survive
    model[4].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    m = measure(model, torch.randn(1, 3, 6, 6), warmup=1, repeats=3)

    assert m.params == sum(p.numel() for p in model.parameters())
    assert m.macs == 3 * 3 * 3 * 4 * 4 * 4 + 4 * 4 * 4 * 2
    assert m.flops == 2 * m.macs
    assert m.macs_by_module["0"] == 3 * 3 * 3 * 4 * 4 * 4
    assert m.uncounted_ops == {}
    assert 0 < m.latency_ms_p10 <= m.latency_ms_median <= m.latency_ms_p90 < math.inf
    assert (m.batch_size, m.threads) == (1, torch.get_num_threads())
    assert [mod.training for mod in model] == [True, False, True, True, True]
    assert not model[4].weight.requires_grad and model[0].weight.requires_grad
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    json.dumps(m.to_dict())


def test_measure_without_latency_leaves_latency_fields_empty() -> None:
    m = measure(nn.Linear(4, 3), torch.zeros(1, 4), latency=False)
    assert (m.latency_ms_median, m.latency_ms_p10, m.latency_ms_p90) == (None, None, None)
    assert m.macs == 12


def test_measure_derives_input_from_pretrained_cfg() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    side = model.pretrained_cfg["input_size"][-1]
    derived = measure(model, latency=False)
    explicit = count_macs(model, torch.zeros(1, *model.pretrained_cfg["input_size"]))
    assert derived.macs == explicit
    assert derived.macs_by_module["conv1"] == 7 * 7 * 3 * 64 * (side // 2) ** 2


def test_measure_without_pretrained_cfg_raises() -> None:
    with pytest.raises(ValueError, match="pretrained_cfg"):
        measure(nn.Linear(2, 2), latency=False)


# ---------------------------------------------------------------- latency


def test_latency_protocol_and_restoration() -> None:
    original = torch.get_num_threads()
    outside, inside = 2, 1
    model = _Recorder().train()
    try:
        torch.set_num_threads(outside)
        stats = measure_latency(
            model, torch.randn(2, 4), batch_size=3, threads=inside, warmup=2, repeats=5
        )
        restored = torch.get_num_threads()
    finally:
        torch.set_num_threads(original)

    assert restored == outside
    assert model.training and model.bn.training
    assert len(model.seen) == 2 + 5
    # Batch 2 repeated 3 times, fixed threads, eval mode, inference mode.
    assert set(model.seen) == {(6, inside, False, True)}
    assert len(stats.samples_ms) == 5 and all(0 < s < math.inf for s in stats.samples_ms)
    assert (
        min(stats.samples_ms)
        <= stats.p10_ms
        <= stats.median_ms
        <= stats.p90_ms
        <= max(stats.samples_ms)
    )
    ordered = sorted(stats.samples_ms)  # 5 samples: linear interpolation between ranks
    assert stats.median_ms == ordered[2]
    assert stats.p10_ms == pytest.approx(ordered[0] + 0.4 * (ordered[1] - ordered[0]))
    assert stats.p90_ms == pytest.approx(ordered[3] + 0.6 * (ordered[4] - ordered[3]))
    assert (stats.threads, stats.batch_size) == (inside, 3)


def test_latency_restores_state_on_error() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    original = torch.get_num_threads()
    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(model, torch.zeros(1), threads=1 if original != 1 else 2)
    assert torch.get_num_threads() == original
    assert model.training
    assert gc.isenabled()


# ---------------------------------------------------------------- compare()


def _measurement(
    params: int, macs: int, latency_ms: float | None, *, batch_size: int = 1, threads: int = 2
) -> Measurement:
    spread = None if latency_ms is None else (0.9 * latency_ms, 1.2 * latency_ms)
    return Measurement(
        params=params,
        macs=macs,
        macs_by_module={"": macs},
        uncounted_ops={},
        latency_ms_median=latency_ms,
        latency_ms_p10=None if spread is None else spread[0],
        latency_ms_p90=None if spread is None else spread[1],
        batch_size=batch_size,
        threads=threads,
    )


def test_compare_arithmetic() -> None:
    table = compare(
        _measurement(4_000_000, 1_000_000_000, 20.0), _measurement(3_000_000, 400_000_000, 8.0)
    )

    assert isinstance(table, ComparisonTable)
    assert [row.metric for row in table.rows] == ["params", "macs", "latency_ms"]
    assert table.row("params").reduction_pct == pytest.approx(25.0)
    assert table.row("macs").reduction_pct == pytest.approx(60.0)
    assert table.row("latency_ms").speedup_x == pytest.approx(2.5)
    assert table.row("latency_ms").after_p10_p90 == pytest.approx((7.2, 9.6))
    assert [row.cells()[3] for row in table.rows] == ["-25.0%", "-60.0%", "2.50x"]


def test_compare_renderings() -> None:
    table = compare(
        _measurement(4_000_000, 1_000_000_000, 20.0), _measurement(3_000_000, 400_000_000, 8.0)
    )

    lines = str(table).splitlines()
    header, rule, *rows, footer = lines
    assert header.split() == ["metric", "before", "after", "change"]
    assert len({len(header), len(rule), *(len(r) for r in rows)}) == 1  # aligned columns
    assert rows[1].split()[0] == "MACs" and "1.00 G" in rows[1] and "400.00 M" in rows[1]
    assert "batch 1, 2 thread(s)" in footer

    markdown = table.to_markdown().splitlines()
    assert markdown[0] == "| metric | before | after | change |"
    assert markdown[2] == "| params | 4.00 M | 3.00 M | -25.0% |"
    assert markdown[4] == "| latency | 20.00 ms [18.00-24.00] | 8.00 ms [7.20-9.60] | 2.50x |"

    data = json.loads(json.dumps(table.to_dict()))
    assert data["rows"][1] == {
        "metric": "macs",
        "before": 1_000_000_000,
        "after": 400_000_000,
        "reduction_pct": 60.0,
        "speedup_x": 2.5,
    }


def test_compare_edge_cases() -> None:
    untimed = compare(_measurement(10, 0, None), _measurement(12, 0, 5.0))
    assert [row.metric for row in untimed.rows] == ["params", "macs"]  # latency needs both sides
    assert untimed.row("params").reduction_pct == pytest.approx(-20.0)  # grew
    assert untimed.row("macs").reduction_pct is None and untimed.row("macs").speedup_x is None
    assert "n/a" in str(untimed)
    with pytest.raises(KeyError, match="params"):
        untimed.row("latency_ms")
    with pytest.raises(ValueError, match="batch_size"):
        compare(_measurement(1, 1, 1.0, batch_size=1), _measurement(1, 1, 1.0, batch_size=8))
    with pytest.raises(ValueError, match="threads"):
        compare(_measurement(1, 1, 1.0, threads=1), _measurement(1, 1, 1.0, threads=2))
