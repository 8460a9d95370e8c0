"""The Hugging Face contract after removal: module width attributes and the model's config.

A Hugging Face model keeps its widths twice: in module attributes its forward reads
(GPT-2's ``Conv1D.nf``, ``GPT2Attention.split_size``, BERT's ``all_head_size``) and in
``model.config``, from which ``from_pretrained`` rebuilds the model before loading the
weights. Removal cuts weights; this module makes both follow, in the same pass
(:func:`graphprune.apply_plan_` calls it through :mod:`graphprune.timm_contract`).

* **Module attributes** (:data:`READERS`): before the cut, each known attribute is tied to a
  reader that computes it from the module's own layers (``nf`` is ``weight.shape[1]``); a tie
  is kept only when the reader gives the attribute's current value, so a reader that does not
  apply to a module is skipped, never guessed from. After the cut the attribute is re-read.
* **Config** (:func:`sync_config_`): ``num_attention_heads``, ``num_key_value_heads``,
  ``head_dim``, ``hidden_size`` and ``intermediate_size`` (GPT-2: ``n_inner``) are read from the
  pruned layers. A config holds one width per kind of layer, so a field is set only when every
  layer agrees; :func:`config_mismatches` rebuilds the model from its config on the meta device
  and lists every parameter whose shape the config does not reproduce (empty: the model
  survives ``save_pretrained`` -> ``from_pretrained``). :func:`uniform_selection` makes a
  selection the config can hold.

Example:
    >>> import torch, transformers, graphprune as gp
    >>> config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                  intermediate_size=64, vocab_size=50)
    >>> model = transformers.BertModel(config).eval()
    >>> small = gp.prune(model, torch.randint(0, 50, (1, 6)), ratio=0.25)
    >>> small.config.intermediate_size, config_mismatches(small)
    (48, [])
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn

# model types whose attention reads ``config.head_dim`` though their config may not set it; a config
# that sets ``head_dim`` holds it too (see holds_head_dim). Elsewhere (BERT, GPT-2) the head size is
# ``hidden_size // num_attention_heads``, so a config cannot hold fewer heads of the same size
HEAD_DIM_IN_CONFIG = frozenset({"qwen2", "vit"})
_QUERY = ("q_proj", "query", "c_attn")  # a query projection (GPT-2's c_attn holds q, k and v)
_MLP_IN = ("gate_proj", "up_proj", "c_fc", "fc1", "gate_up_proj")  # Phi-3 fuses gate and up: half each


def holds_head_dim(config: object) -> bool:
    """Whether a config keeps the head size apart from ``hidden_size // num_attention_heads``.

    Example:
        >>> import transformers
        >>> holds_head_dim(transformers.LlamaConfig()), holds_head_dim(transformers.BertConfig())
        (True, False)
    """
    return getattr(config, "model_type", None) in HEAD_DIM_IN_CONFIG or getattr(config, "head_dim", None) is not None


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (transformers is not imported here).

    Example:
        >>> is_hf_model(torch.nn.Linear(2, 2))
        False
    """
    module = sys.modules.get("transformers")
    return module is not None and isinstance(model, module.PreTrainedModel)


def _is_conv1d(layer: object) -> bool:
    return type(layer).__name__ == "Conv1D" and isinstance(getattr(layer, "weight", None), torch.Tensor)


def _width(layer: object, side: str) -> int | None:
    """``"out"`` or ``"in"`` width of a linear-like layer: ``nn.Linear`` weights are (out, in), GPT-2 ``Conv1D``
    weights (in, out); None for any other layer."""
    if _is_conv1d(layer):
        return int(layer.weight.shape[1 if side == "out" else 0])
    if isinstance(layer, nn.Linear):
        return int(layer.weight.shape[0 if side == "out" else 1])
    return None


def _out(layer: object) -> int | None:
    """Output width of a linear-like layer (see :func:`_width`)."""
    return _width(layer, "out")


def _in(layer: object) -> int | None:
    """Input width of a linear-like layer (see :func:`_width`)."""
    return _width(layer, "in")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def head_size(module: nn.Module) -> int | None:
    """Width of one attention head of an attention module, ``None`` for other modules.

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> head_size(model.h[0].attn), head_size(model.h[0].mlp)
        (8, None)
    """
    size = getattr(module, "head_dim", getattr(module, "attention_head_size", None))
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or _child(module, _QUERY) is None:
        return None
    return size


def query_width(module: nn.Module) -> int | None:
    """Width of an attention module's query projection (GPT-2's ``c_attn`` holds q, k and v).

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> query_width(model.h[0].attn), model.h[0].attn.c_attn.nf
        (32, 96)
    """
    layer = _child(module, _QUERY)
    width = _out(layer)
    if width is None or head_size(module) is None:
        return None
    fused = layer is getattr(module, "c_attn", None) and not getattr(module, "is_cross_attention", False)
    return width // 3 if fused else width


def _heads(module: nn.Module) -> int | None:
    width, size = query_width(module), head_size(module)
    return width // size if width is not None and size else None


def _kv_heads(module: nn.Module) -> int | None:
    width, size = _out(getattr(module, "k_proj", None)), head_size(module)
    return width // size if width is not None and size else None


READERS: Mapping[str, Callable[[nn.Module], int | None]] = {
    "nf": lambda m: _out(m) if _is_conv1d(m) else None,
    "nx": lambda m: _in(m) if _is_conv1d(m) else None,
    "split_size": lambda m: query_width(m) if _out(getattr(m, "c_attn", None)) else None,
    "embed_dim": lambda m: _out(getattr(m, "c_proj", None)) if head_size(m) else None,
    "all_head_size": query_width,
    "num_heads": _heads,
    "num_attention_heads": _heads,
    "num_key_value_heads": _kv_heads,
    "num_key_value_groups": lambda m: _heads(m) // _kv_heads(m) if _heads(m) and _kv_heads(m) else None,
    "intermediate_size": lambda m: _mlp_width(m),
    "hidden_size": lambda m: _in(_child(m, _MLP_IN)) or _norm_width(getattr(m, "input_layernorm", None)),
}


def _mlp_width(module: nn.Module) -> int | None:
    layer = _child(module, _MLP_IN)
    width = _out(layer)
    return width // 2 if width is not None and layer is getattr(module, "gate_up_proj", None) else width


def _norm_width(norm: object) -> int | None:
    weight = getattr(norm, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def find_ties(model: nn.Module) -> dict[tuple[str, str, None], Callable[[nn.Module], int | None]]:
    """Tie every module attribute a reader reproduces to that reader (call before removal).

    Returns:
        ``{(module, attribute, None): reader}``, the layout of
        :func:`graphprune.timm_contract.find_witnesses`.

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> sorted(attr for module, attr, _ in find_ties(model) if module == "h.0.attn")
        ['embed_dim', 'num_heads', 'split_size']
    """
    ties = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            reader = READERS.get(attr)
            if reader is not None and isinstance(value, int) and not isinstance(value, bool) and reader(module) == value:
                ties[(name, attr, None)] = reader
    return ties


def apply_ties_(model: nn.Module, ties: Mapping[tuple[str, str, None], Callable[[nn.Module], int | None]]) -> None:
    """Re-read every tied attribute from the cut layers, then :func:`sync_config_` (call after removal).

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_inner=64))
        >>> ties = find_ties(model)
        >>> model.h[0].mlp.c_fc.weight = torch.nn.Parameter(torch.zeros(32, 48))  # stands in for a cut
        >>> model.h[0].mlp.c_proj.weight = torch.nn.Parameter(torch.zeros(48, 32))
        >>> apply_ties_(model, ties)
        >>> model.h[0].mlp.c_fc.nf, model.h[0].mlp.c_proj.nx, model.config.n_inner
        (48, 48, 48)
    """
    for (name, attr, _), reader in ties.items():
        module = model.get_submodule(name)
        value = reader(module)
        if value is not None:
            setattr(module, attr, value)
    sync_config_(model)


def _agreed(values: list[int | None]) -> int | None:
    """The one value all layers share, or ``None`` (no layer, or layers that differ)."""
    found = {v for v in values if v is not None}
    return found.pop() if len(found) == 1 and None not in values else None


def layer_widths(model: nn.Module) -> dict[str, list[int | None]]:
    """Per-layer widths that the config holds once: config field -> one value per layer.

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48))
        >>> layer_widths(model)["n_inner"]
        [48, 48]
    """
    attention = [m for m in model.modules() if head_size(m) is not None and query_width(m) is not None]
    mlps = [m for m in model.modules() if _child(m, _MLP_IN) is not None and head_size(m) is None]
    mlps += [m for m in model.modules() if type(m).__name__.endswith("Intermediate") and _out(getattr(m, "dense", None))]
    inner = "n_inner" if hasattr(model.config, "n_inner") else "intermediate_size"
    widths = {"num_attention_heads": [_heads(m) for m in attention],
              "head_dim": [head_size(m) for m in attention],
              inner: [_mlp_width(m) if _child(m, _MLP_IN) is not None else _out(m.dense) for m in mlps]}
    if getattr(model.config, "num_key_value_heads", None) is not None:
        widths["num_key_value_heads"] = [_kv_heads(m) for m in attention]
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model without input embeddings (audio, some encoders)
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    projection = getattr(embeddings, "projection", None)
    if isinstance(embeddings, nn.Embedding):
        widths["hidden_size"] = [int(weight.shape[1])]
    elif isinstance(projection, nn.Conv2d):  # ViT's patch embedding
        widths["hidden_size"] = [int(projection.out_channels)]
    return widths


def sync_config_(model: nn.Module) -> list[str]:
    """Set the config's widths from the pruned layers where every layer agrees (in place).

    The config object is replaced by an updated copy on the model and on every module that
    shares it, so :func:`graphprune.removal.restore_on_error` can put the old one back.

    Returns:
        The fields the config cannot hold (layers differ), left as they were.

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> sync_config_(model), model.config.n_inner
        ([], 128)
    """
    old = getattr(model, "config", None)
    if old is None:
        return []
    new = copy.deepcopy(old)
    unsynced = []
    for field, values in layer_widths(model).items():
        value = _agreed(values)
        if value is None:
            if values:
                unsynced.append(field)
            continue
        if field == "head_dim" and not holds_head_dim(old):
            continue  # derived from hidden_size // num_attention_heads: config_mismatches reports a conflict
        setattr(new, field, value)
    for module in model.modules():
        if module.__dict__.get("config") is old:
            module.config = new
    return unsynced


def mismatched_parameters(model: nn.Module) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]]:
    """Parameters whose shape the model's config does not reproduce: name -> (config's, model's).

    Builds ``type(model)(model.config)`` on the meta device, so nothing is allocated.

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> model.h[0].mlp.c_fc.weight = torch.nn.Parameter(torch.zeros(32, 100))
        >>> mismatched_parameters(model)
        {'h.0.mlp.c_fc.weight': ((32, 128), (32, 100))}
    """
    with torch.device("meta"):
        rebuilt = type(model)(copy.deepcopy(model.config))
    expected = {n: tuple(p.shape) for n, p in rebuilt.named_parameters()}
    return {n: (expected.get(n), tuple(p.shape)) for n, p in model.named_parameters() if expected.get(n) != p.shape}


def config_mismatches(model: nn.Module) -> list[str]:
    """:func:`mismatched_parameters` as sentences (empty: the model round-trips through its config).

    Example:
        >>> import transformers
        >>> model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
        >>> config_mismatches(model)
        []
    """
    return [f"{n}: config gives {want}, model has {have}" for n, (want, have) in mismatched_parameters(model).items()]
