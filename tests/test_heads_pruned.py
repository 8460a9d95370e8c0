"""Attention heads really go: a timm ViT loses whole heads at a ratio that asks for one of three,
with ``num_heads`` patched and no group dropped by verification (a regression guard: a plan that
cuts ``qkv`` but keeps ``num_heads`` fails verification and silently keeps every head)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import graphprune as gp


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_loses_whole_heads_and_verification_drops_nothing(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a group left unpruned by verification warns
        pruned = gp.prune(model, x, ratio=0.34)
    for block in pruned.blocks:
        assert block.attn.num_heads == 2
        assert block.attn.qkv.out_features == 3 * 2 * block.attn.head_dim
    assert pruned(x).shape == model(x).shape
