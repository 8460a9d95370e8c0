"""Hugging Face transformers: grouped-query attention, GPT-2's Conv1D, config sync.

Every model is a tiny config built offline (no hub access) and runs in float64, so the
zero-then-remove checks hold to rounding: the channels a plan removes are zeroed in their
producers first, and removing them must then leave the outputs unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.verify import apply_verified_
from graphprune.testing import pick_channels, zero_channels_

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, HEAD_DIM, VOCAB = 64, 4, 16, 128
# Llama / Qwen2 heads of 8 (config.head_dim): their eager scale 8 ** -0.5 equals no other count the
# attention reads; with heads of 16 it is 1/4, the number of heads (see the xfail below)
GQA_HEAD_DIM = 8


def _decoder(family: str, kv_heads: int = 2, attn: str = "sdpa", lm_head: bool = False,
             head_dim: int = GQA_HEAD_DIM) -> torch.nn.Module:
    """A 2-layer Llama or Qwen2 (Qwen2 has q/k/v biases, Llama none) with ``kv_heads`` kv heads."""
    config_cls, base, causal = {
        "llama": (transformers.LlamaConfig, transformers.LlamaModel, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_cls(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
                        num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=VOCAB,
                        max_position_embeddings=64, tie_word_embeddings=False)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = (causal if lm_head else base)(config).double().eval()
    _randomize_norms(model)
    return model


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0, which would hide a wrong index map."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def _ids(batch: int = 2, tokens: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _zero_then_remove(model: torch.nn.Module, x: torch.Tensor, ratio: float = 0.5, *, exact_only: bool = True,
                      may_drop: str | None = None) -> tuple[float, float, gp.Plan]:
    """Zero ``ratio`` of every group's exactly-removable channels, remove them; (max diff, max |out|, plan).

    Verification may drop only groups that have a member named ``may_drop`` (none by default)."""
    zeroed = copy.deepcopy(model)
    groups = gp.find_groups(gp.trace(zeroed, x), model=zeroed)
    picked = pick_channels(groups, ratio, exact_only=exact_only)
    zero_channels_(zeroed, groups, picked)
    expected = _output(zeroed, x)
    plan, dropped = apply_verified_(zeroed, groups, gp.make_plan(groups, removed=picked), (x,))
    assert all(any(m.name.endswith(may_drop or "-") for m in groups.by_id(g).members) for g in dropped), dropped
    got = _output(zeroed, x)
    assert got.shape == expected.shape
    return float((got - expected).abs().max()), float(expected.abs().max()), plan


def _attention_group(groups: gp.Groups, layer: int) -> gp.ChannelGroup:
    name = f"layers.{layer}.self_attn.q_proj.weight"
    found = [g for g in groups.all if any(m.name == name and m.dim == 0 for m in g.members)]
    assert len(found) == 1, [g.describe() for g in found]
    return found[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gqa_kv_head_is_one_channel_with_its_query_group(family: str, attn: str) -> None:
    """One channel per kv head: its k and v rows and the rows of its 2 query heads (SDPA's
    ``enable_gqa`` path and the eager ``repeat_kv`` path agree)."""
    model = _decoder(family, attn=attn)
    groups = gp.find_groups(gp.trace(model, _ids()), model=model)
    for layer in range(2):
        group = _attention_group(groups, layer)
        members = {(m.name.split("self_attn.")[1], m.dim): m.channel for m in group.members}
        assert group.size == 2 and group.prunable.all()
        np.testing.assert_array_equal(members[("q_proj.weight", 0)], np.repeat([0, 1], 2 * GQA_HEAD_DIM))
        np.testing.assert_array_equal(members[("o_proj.weight", 1)], np.repeat([0, 1], 2 * GQA_HEAD_DIM))
        np.testing.assert_array_equal(members[("k_proj.weight", 0)], np.repeat([0, 1], GQA_HEAD_DIM))
        np.testing.assert_array_equal(members[("v_proj.weight", 0)], np.repeat([0, 1], GQA_HEAD_DIM))
        assert (("k_proj.bias", 0) in members) == (family == "qwen2")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gqa_zero_then_remove_is_exact(family: str, attn: str) -> None:
    model = _decoder(family, attn=attn)
    # the eager path's softmax marks every dim of the logits a statistic, heads included (a zeroed
    # head's logits are uniform, not zero); its zeroed values make the head's output zero all the same
    diff, scale, plan = _zero_then_remove(model, _ids(), exact_only=attn == "sdpa")
    removed = {e.name: e.size - len(e.keep) for e in plan.edits}
    for layer in range(2):  # one kv head of two, with its two query heads, in every layer
        prefix = f"layers.{layer}.self_attn."
        assert removed[prefix + "k_proj.weight"] == removed[prefix + "v_proj.weight"] == GQA_HEAD_DIM
        assert removed[prefix + "q_proj.weight"] == removed[prefix + "o_proj.weight"] == 2 * GQA_HEAD_DIM
    assert scale > 0.1 and diff < 1e-12, (diff, scale)


def test_gqa_eager_heads_of_16_with_4_heads() -> None:
    """The eager path multiplies the logits by ``scaling = 16 ** -0.5 = 0.25``, equal to 1 / (4 heads
    read from a shape) but set in ``__init__``: not a count used as a number, so the heads stay prunable."""
    model = _decoder("llama", attn="eager", head_dim=16)
    groups = gp.find_groups(gp.trace(model, _ids()), model=model)
    assert _attention_group(groups, 0).prunable.all()
    diff, scale, plan = _zero_then_remove(model, _ids(), exact_only=False)  # heads too (see above)
    assert any(e.name == "layers.0.self_attn.k_proj.weight" for e in plan.edits)
    assert scale > 0.1 and diff < 1e-12, (diff, scale)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gqa_prune_runs_and_keeps_the_group_size(family: str) -> None:
    model, ids = _decoder(family), _ids()
    small = gp.prune(model, ids, ratio=0.5)
    for layer in small.layers:
        attention = layer.self_attn
        assert attention.k_proj.out_features == attention.v_proj.out_features == GQA_HEAD_DIM
        assert attention.q_proj.out_features == attention.o_proj.in_features == 2 * GQA_HEAD_DIM
        assert attention.num_key_value_groups == 2
    assert _output(small, ids).shape == _output(model, ids).shape
    unchanged = gp.prune(model, ids, ratio=0.0)
    assert torch.equal(_output(unchanged, ids), _output(model, ids))


def test_as_many_heads_as_head_dims() -> None:
    """8 heads of 8: HF reads ``query.shape`` and ``value.shape[-1]`` in one call, so a reshape to
    ``(B, -1, T, 8)`` matched both the heads and the head dim and froze the attention."""
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = transformers.Qwen2Model(config).double().eval()
    groups = gp.find_groups(gp.trace(model, _ids()), model=model)
    group = _attention_group(groups, 0)
    assert group.size == 2 and group.prunable.all() and int(group.width.max()) == 4 * 8
    diff, scale, _ = _zero_then_remove(model, _ids())
    assert scale > 0.1 and diff < 1e-12


def test_multi_query_attention_freezes_query_heads() -> None:
    """One kv head shared by all query heads: removing a query head would change the group
    size the model reads from ``num_key_value_groups``, so query heads stay (the MLP prunes).
    The value's head dim looks prunable to the graph, but HF views v with ``self.head_dim``, the
    literal it shares with q and k (RoPE pins theirs): verification drops that group."""
    model = _decoder("llama", kv_heads=1)
    groups = gp.find_groups(gp.trace(model, _ids()), model=model)
    q_rows = [g for g in groups for m in g.members if m.name.endswith("q_proj.weight") and m.dim == 0]
    assert not q_rows
    diff, scale, plan = _zero_then_remove(model, _ids(), may_drop="v_proj.weight")
    assert any(e.name == "layers.0.mlp.up_proj.weight" for e in plan.edits)
    assert scale > 0.1 and diff < 1e-12


def _gpt2(attn: str = "sdpa") -> torch.nn.Module:
    config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=HEADS, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).double().eval()
    _randomize_norms(model)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_conv1d_prunes_heads_and_mlp_exactly(attn: str) -> None:
    """``Conv1D`` is ``addmm(bias, x, weight)`` with an ``(in, out)`` weight: its columns are the
    producing side, and ``nf`` / ``split_size`` / ``num_heads`` follow the cut weights."""
    model = _gpt2(attn)
    groups = gp.find_groups(gp.trace(model, _ids()), model=model)
    roles = {(m.name, m.dim): m.role for g in groups for m in g.members}
    assert roles[("h.0.attn.c_attn.weight", 1)] == roles[("h.0.mlp.c_fc.weight", 1)] == "out"
    assert roles[("h.0.attn.c_proj.weight", 0)] == roles[("h.0.mlp.c_proj.weight", 0)] == "in"
    diff, scale, plan = _zero_then_remove(model, _ids(), exact_only=attn == "sdpa")
    removed = {e.name: e.size - len(e.keep) for e in plan.edits}
    assert removed["h.0.attn.c_attn.weight"] == 3 * 2 * HEAD_DIM and removed["h.1.mlp.c_fc.weight"] == 128
    assert scale > 0.1 and diff < 1e-12, (diff, scale)

    small = gp.prune(model, _ids(), ratio=0.5)
    attention = small.h[0].attn
    assert attention.c_attn.nf == 3 * attention.split_size == 3 * 2 * HEAD_DIM and attention.num_heads == 2
    assert attention.c_proj.nf == HIDDEN and attention.c_proj.nx == 2 * HEAD_DIM  # nf == nx before: not confused
    assert small.h[0].mlp.c_fc.nf == 128
    assert _output(small, _ids()).shape == _output(model, _ids()).shape


def _encoder(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A 2-layer BERT (token ids) or ViT (32x32 images, 16 patches), float64, eval mode."""
    kw = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS)
    torch.manual_seed(0)
    if family == "bert":
        model, x = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, **kw)), _ids()
    else:
        model = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **kw))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = model.double().eval()
    _randomize_norms(model)
    return model, x


def _any_model(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if family in ("bert", "vit"):
        return _encoder(family)
    if family == "gpt2":
        return _gpt2(), _ids()
    return _decoder(family), _ids()


# config after prune_uniform(ratio=0.5): heads where the config has head_dim, MLP widths everywhere
UNIFORM = {
    "llama": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": GQA_HEAD_DIM, "intermediate_size": 48},
    "qwen2": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": GQA_HEAD_DIM, "intermediate_size": 48},
    "vit": {"num_attention_heads": 2, "head_dim": HEAD_DIM, "intermediate_size": 48},
    "bert": {"num_attention_heads": HEADS, "intermediate_size": 48},
    "gpt2": {"num_attention_heads": HEADS, "n_inner": 128},
}


@pytest.mark.parametrize("family", list(UNIFORM))
def test_uniform_prune_survives_save_and_from_pretrained(family: str, tmp_path) -> None:
    model, x = _any_model(family)
    small = gp.prune_uniform(model, x, ratio=0.5)
    assert {k: getattr(small.config, k) for k in UNIFORM[family]} == UNIFORM[family]
    assert small.config.hidden_size == HIDDEN  # the residual stream is the model's output
    assert gp.hf_contract.config_mismatches(small) == []
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert model.config.intermediate_size if family != "gpt2" else model.config.n_inner is None  # input untouched
    small.save_pretrained(tmp_path)
    loaded = type(small).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.dtype == torch.float64
    assert torch.equal(_output(loaded, x), _output(small, x))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_heads_pruned_where_the_config_cannot_hold_them_are_reported(family: str) -> None:
    """``gp.prune`` still removes heads of BERT / GPT-2 (the model runs), but their config derives
    the head size from ``hidden_size // num_attention_heads``: the mismatch is listed."""
    model, x = _any_model(family)
    small = gp.prune(model, x, ratio=0.5)
    mismatches = gp.hf_contract.config_mismatches(small)
    assert mismatches and all("attn" in m or "attention" in m for m in mismatches), mismatches


def test_config_left_alone_where_layers_differ() -> None:
    model, ids = _decoder("llama"), _ids()
    groups = gp.find_groups(gp.trace(model, ids), model=model)
    first = _attention_group(groups, 0)
    small = copy.deepcopy(model)
    gp.apply_plan_(small, gp.make_plan(groups, removed={first.id: (1,)}))  # layer 0 only
    assert small.config.num_attention_heads == HEADS and small.config.num_key_value_heads == 2
    assert gp.hf_contract.sync_config_(small) == ["num_attention_heads", "num_key_value_heads"]
    assert any(m.startswith("layers.0.self_attn.q_proj.weight") for m in gp.hf_contract.config_mismatches(small))


def test_undone_removal_restores_the_config() -> None:
    """A removal undone by :func:`restore_on_error` (how a failed verification undoes one) puts
    the old config object back on every module that shared it."""
    from graphprune.removal import restore_on_error

    model, ids = _decoder("llama"), _ids()
    config = model.config
    groups = gp.find_groups(gp.trace(model, ids), model=model)
    plan = gp.make_plan(groups, gp.get_scorer("l1")(groups, model), ratio=0.5)
    with pytest.raises(RuntimeError, match="undo"):
        with restore_on_error(model):
            gp.apply_plan_(model, plan)
            assert model.config.num_attention_heads == 2 and model.layers[0].self_attn.config is model.config
            raise RuntimeError("undo")
    assert model.config is config and model.layers[0].self_attn.config is config
    assert config.num_attention_heads == HEADS and model.layers[0].self_attn.q_proj.out_features == HEADS * GQA_HEAD_DIM


def test_uniform_prune_of_causal_lms_cuts_what_the_config_can_hold(tmp_path) -> None:
    """With a language-model head the residual stream is prunable. Llama's config holds a narrower
    ``hidden_size`` next to ``head_dim``; GPT-2's cannot (head size is ``n_embd // n_head``), so its
    residual kind (cut on the first try, with the heads kept) is left whole on the second and only
    the MLP width changes."""
    llama = _decoder("llama", lm_head=True)
    small = gp.prune_uniform(llama, _ids(), ratio=0.25)
    assert (small.config.hidden_size, small.config.head_dim, small.config.intermediate_size) == (48, GQA_HEAD_DIM, 72)
    layer = small.model.layers[0]  # the module attributes follow too
    assert (layer.hidden_size, layer.mlp.hidden_size, layer.mlp.intermediate_size) == (48, 48, 72)
    small.save_pretrained(tmp_path / "llama")
    loaded = type(small).from_pretrained(tmp_path / "llama", dtype=torch.float64).eval()
    assert torch.equal(_output(loaded, _ids()), _output(small, _ids()))

    config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=HEADS, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(config).double().eval()
    small = gp.prune_uniform(gpt2, _ids(), ratio=0.25)
    assert (small.config.n_embd, small.config.n_inner) == (HIDDEN, 192)
    assert gp.hf_contract.config_mismatches(small) == []


OTHER_DECODERS = {  # family -> query heads left by prune_uniform(ratio=0.5)
    "mistral": 2, "qwen3": 2, "gemma": 2,
    "phi3": HEADS,  # its fused qkv_proj is cut with constant slices (qkv[..., :query_pos]): heads frozen
}


@pytest.mark.parametrize("family", list(OTHER_DECODERS))
def test_other_decoders_prune_exactly_and_keep_their_config(family: str) -> None:
    """Mistral, Qwen3 (q/k norms over the head dim), Gemma and Phi-3 (fused gate_up_proj)."""
    config_cls, model_cls = {"mistral": (transformers.MistralConfig, transformers.MistralModel),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3Model),
                             "gemma": (transformers.GemmaConfig, transformers.GemmaModel),
                             "phi3": (transformers.Phi3Config, transformers.Phi3Model)}[family]
    config = config_cls(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
                        num_key_value_heads=2, head_dim=GQA_HEAD_DIM, vocab_size=VOCAB, pad_token_id=0)
    torch.manual_seed(0)
    model = model_cls(config).double().eval()
    _randomize_norms(model)
    diff, scale, _ = _zero_then_remove(model, _ids())
    assert scale > 0.1 and diff < 1e-12, (diff, scale)
    small = gp.prune_uniform(model, _ids(), ratio=0.5)
    assert (small.config.num_attention_heads, small.config.intermediate_size) == (OTHER_DECODERS[family], 48)
    assert gp.hf_contract.config_mismatches(small) == []
