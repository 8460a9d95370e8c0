"""Transfer-learning recipes around the pruning engine: config in, model + metrics (JSON/CSV) out.

* :func:`s_to_t`, :func:`s_tp_t`, :func:`sp_t`: fine-tune; fine-tune, prune, fine-tune; prune,
  fine-tune (:mod:`.pipelines`).
* :func:`transtailor`: TransTailor's iterative target-aware pruning with importance-aware
  fine-tuning (:mod:`.transtailor`).
* :func:`block_search`: NetTailor-style depth search, removing whole residual blocks, then
  optionally channels (:mod:`.blocksearch`).
* ``PruneConfig(granularity="kernel" | "unstructured")``: the pruning stage of S->TP->T and
  SP->T at a finer granularity than channels, as masks kept through fine-tuning and returned
  deployed (:mod:`.sparse`; :func:`sparse_sp_t` is the earlier spelling, an alias of ``sp_t``).
* Data the timm way, decoded once (:mod:`.data`), device / bf16 / ``channels_last``
  (:mod:`.device`), the linear probe (:mod:`.probe`), the training loop on timm's optimizer and
  scheduler (:mod:`.finetune`), stage checkpoints and resume (:mod:`.checkpoint`),
  ``torchrun`` support with gloo or NCCL (:mod:`.distributed`).

Example:
    >>> import graphprune.recipes as recipes
    >>> config = recipes.TransferConfig(prune=recipes.PruneConfig(scorer="l1", flops_reduction=0.3))
    >>> config.prune.plan_config().scope
    'local'
"""

# The data-driven scorers register themselves on import; the recipes name them in configs.
from ..scoring import classmean as _classmean, target_taylor as _target_taylor, taylor as _taylor  # noqa: F401
from .blocksearch import BlockSearchConfig, block_search
from .checkpoint import StageStore, atomic_write_text
from .config import FinetuneConfig, PruneConfig, RunConfig, TransferConfig, TransTailorConfig
from .data import DecodedImages, NormalizeCollate, TransferData, check_splits, data_config, eval_loader, image_folder_data
from .device import DeviceLoader, Placement, resolve_device
from .distributed import DistContext, context
from .finetune import build_optimizer, build_schedule, evaluate, features_and_logits, finetune_, seed_everything
from .pipelines import s_to_t, s_tp_t, sp_t
from .run import RecipeRun, check_data, on_device
from .norms import kept_channels, recalibrate_norms_, shift_norms_
from .probe import extract_features, fit_logistic, linear_probe_
from .records import RecipeResult, StageRecord, records_csv
from .importance import applied_factors, fold_factors_, importance_factors
from .stages import prune_stage_
from .sparse import SparseTransferConfig, sparse_sp_t
from .transtailor import transtailor

__all__ = [
    "BlockSearchConfig", "block_search", "DistContext", "FinetuneConfig", "PruneConfig", "RecipeResult", "RunConfig", "StageRecord", "StageStore",
    "RecipeRun", "TransTailorConfig", "TransferConfig", "TransferData", "atomic_write_text", "check_data", "check_splits",
    "context", "data_config", "eval_loader", "evaluate", "features_and_logits", "finetune_", "image_folder_data",
    "prune_stage_", "records_csv", "s_tp_t", "s_to_t", "sp_t", "transtailor", "SparseTransferConfig", "sparse_sp_t",
    "applied_factors", "fold_factors_", "importance_factors",
    "DecodedImages", "DeviceLoader", "NormalizeCollate", "Placement", "build_optimizer", "build_schedule",
    "extract_features", "fit_logistic", "linear_probe_", "on_device", "recalibrate_norms_", "resolve_device", "seed_everything", "shift_norms_", "kept_channels",
]
