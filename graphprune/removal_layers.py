"""Size attributes of torch layers that keep their weights in a layout of their own.

:mod:`graphprune.removal` cuts parameters; these layers must then be told their new sizes,
derived from the cut weights (as it does for convolutions), since their forward reads them:

* ``nn.MultiheadAttention``: ``embed_dim``, ``kdim``, ``vdim`` and ``num_heads`` (heads are
  removed whole, :mod:`graphprune.rules.attention_mha`, so ``head_dim`` is unchanged);
* ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: ``input_size``, ``hidden_size``, ``proj_size``, and the
  ``_flat_weights`` list the forward passes to the kernel, which holds the tensors themselves
  and must point at the new ones (also after a failed removal is undone).

Example:
    >>> import torch
    >>> lstm = torch.nn.LSTM(4, 3)
    >>> lstm._parameters["weight_ih_l0"] = torch.nn.Parameter(lstm.weight_ih_l0[:, :2])
    >>> update_sizes_(lstm)
    >>> lstm.input_size, lstm._flat_weights[0].shape
    (2, torch.Size([12, 2]))
"""

from __future__ import annotations

from torch import nn

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def update_sizes_(module: nn.Module) -> None:
    """Set the size attributes of an attention or recurrent layer from its (cut) weights; other modules: nothing."""
    if isinstance(module, nn.MultiheadAttention):
        _attention(module)
    elif isinstance(module, nn.RNNBase):
        _recurrent(module)


def refresh_(module: nn.Module) -> None:
    """Point a recurrent layer's ``_flat_weights`` at its current parameters (after they were swapped)."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _attention(module: nn.MultiheadAttention) -> None:
    if module._qkv_same_embed_dim:
        embed = kdim = vdim = module.in_proj_weight.shape[1]
    else:
        embed, kdim, vdim = (module.q_proj_weight.shape[1], module.k_proj_weight.shape[1],
                             module.v_proj_weight.shape[1])
    width = module.out_proj.weight.shape[1]  # num_heads * head_dim: the heads that are left
    if width % module.head_dim:
        raise ValueError(f"{type(module).__name__}: {width} attention channels are not whole heads "
                         f"of {module.head_dim}")
    module.embed_dim, module.kdim, module.vdim, module.num_heads = embed, kdim, vdim, width // module.head_dim


def _recurrent(module: nn.RNNBase) -> None:
    module.input_size = module.weight_ih_l0.shape[1]
    module.hidden_size = module.weight_ih_l0.shape[0] // _GATES[module.mode]
    if getattr(module, "proj_size", 0) > 0:
        module.proj_size = module.weight_hr_l0.shape[0]
    module._init_flat_weights()
