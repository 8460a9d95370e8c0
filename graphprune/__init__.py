"""graphprune: structural pruning of pretrained PyTorch / timm models for transfer learning.

The pipeline, one public verb per stage::

    graph  = gp.trace(model, example_inputs)            # what ran, and what couples
    groups = gp.find_groups(graph, ignore=...)          # channels removed together
    scores = gp.get_scorer("l1")(groups, model)         # {group_id: Tensor[group.size]}
    plan   = gp.make_plan(groups, scores, ratio=0.3)    # plain data, JSON-serializable
    gp.apply_plan_(model, plan)                         # the one removal pass (in place)

``gp.prune(model, example_inputs, ratio=0.3)`` does all of it on a copy. Depth as well as width:
``gp.blocks.find_blocks`` finds the residual blocks, ``gp.blocks.apply_block_plan_`` removes them.
"""

from .api import prune, prune_
from .errors import GraphpruneError, InvalidArgumentError, PruneError, UnsupportedModelError, UntracedCodeError
from .graph import TraceGraph
from .groups import ChannelGroup, Groups, Member, classifier_names, find_groups
from .patches import AttrPatch
from .plan import ParamEdit, Plan, make_plan
from .selection import PlanConfig, removal_table, select_channels
from .removal import apply_plan_
from .scoring import get_scorer, list_scorers, register_scorer
from .tracer import trace

from . import measurement  # noqa: E402  (gp.measurement.compare / count_macs / ...)
from .measurement import measure  # noqa: E402  (gp.measure(model, inputs))
from .io import load, save  # noqa: E402
from . import blocks  # noqa: E402  (gp.blocks.find_blocks / apply_block_plan_)
from . import hf_contract  # noqa: E402  (gp.hf_contract.config_mismatches / sync_config_)
from .uniform import prune_uniform, uniform_selection  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttrPatch", "ChannelGroup", "blocks", "GraphpruneError", "Groups", "InvalidArgumentError", "Member", "ParamEdit",
    "Plan", "PlanConfig", "PruneError", "TraceGraph", "UnsupportedModelError", "UntracedCodeError", "apply_plan_", "classifier_names",
    "find_groups", "get_scorer", "list_scorers", "hf_contract", "load", "measure", "measurement", "save", "make_plan", "prune", "prune_", "prune_uniform", "register_scorer", "removal_table", "select_channels", "trace",
    "uniform_selection",
]
