"""The fine granularities: unstructured and N:M masks, and kernel (filter) pruning.

* Masks (:mod:`.unstructured`, :mod:`.nm`, :mod:`.gradual`) are ``torch.nn.utils.prune``
  reparametrizations (``weight = weight_orig * weight_mask``, a forward pre-hook): they hold
  through any training loop, and :func:`make_permanent_` folds them for export. Layer-wise or
  global magnitude (or random), one-shot or gradual (GMP's cubic schedule), N:M.
* Kernel pruning (:mod:`.kernel_conv`, :mod:`.kernel_plan`) is structural: each dense conv
  becomes a :class:`KernelConv2d` (gather + grouped conv), recorded as a ``graphprune.kernels/1``
  plan that :func:`graphprune.io.save` / ``load`` replay. To fine-tune at dense speed, mask the
  kernels first and make the convs structural afterwards (:mod:`.kernel_masks`).
* FLOPs budgets (:mod:`.budget`) and the effective MACs of masked weights (:mod:`.weights`).

Example:
    >>> import timm, torch
    >>> from graphprune import sparsity
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> round(sparsity.magnitude_masks_(model, 0.5).sparsity, 3)
    0.5
    >>> sparsity.make_permanent_(model)[:2]
    ['conv1', 'layer1.0.conv1']
"""

from .budget import (BudgetResult, check_reduction, global_sparsity_for_macs, kernel_masks_to_flops_,
                     kernel_prune_to_flops_, unstructured_to_flops_)
from .gradual import GradualPruner, GradualSchedule
from .kernel_conv import KernelConv2d, check_index, check_kernels_per_output
from .kernel_masks import kernel_convs_from_masks_, kernel_mask_index, kernel_masks_
from .kernel_plan import (KERNEL_PLAN_FORMAT, KernelLayer, KernelPlan, apply_kernel_plan_, dense_convs, is_kernel_plan,
                          kernel_counts, kernel_indices, kernel_prune_, kernel_scores, replace_convs_)
from .nm import NMMagnitude, check_nm, is_nm, nm_masks_, semi_structured_
from .unstructured import (SCOPES, SIGNALS, SparsityReport, check_sparsity, grow_masks_, install_masks_,
                           magnitude_masks_, make_permanent_, masked_modules)
from .weights import (MASKABLE_TYPES, effective_macs, effective_weight, is_masked, maskable_modules, module_sparsity,
                      overall_sparsity)

__all__ = [
    "BudgetResult", "GradualPruner", "GradualSchedule", "KERNEL_PLAN_FORMAT", "KernelLayer", "KernelPlan",
    "MASKABLE_TYPES", "NMMagnitude", "SCOPES", "SIGNALS", "SparsityReport", "apply_kernel_plan_", "check_index",
    "check_kernels_per_output", "check_nm", "check_reduction", "check_sparsity", "dense_convs", "effective_macs",
    "effective_weight", "global_sparsity_for_macs", "grow_masks_", "install_masks_", "is_kernel_plan", "is_masked",
    "is_nm",
    "kernel_convs_from_masks_", "kernel_counts", "kernel_indices", "kernel_mask_index", "kernel_masks_",
    "kernel_masks_to_flops_", "kernel_prune_", "kernel_prune_to_flops_", "kernel_scores", "magnitude_masks_",
    "make_permanent_", "maskable_modules", "masked_modules", "module_sparsity", "nm_masks_", "overall_sparsity",
    "replace_convs_", "semi_structured_", "unstructured_to_flops_",
]
