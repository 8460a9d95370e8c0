"""Save and load pruned models without pickle.

A pruned model is saved as a **directory** with two files::

    my_model/
        model.safetensors   # the weights (tied tensors stored once)
        graphprune.json     # how to rebuild the structure, and what the weights must look like

``graphprune.json`` holds (``"format": "graphprune.model/1"``):

* ``architecture``: ``{"timm": name, "kwargs": {...}, "input_size": [C, H, W]}``; the base is
  ``timm.create_model(name, pretrained=False, **kwargs)``. Or ``{"factory": "module:function",
  "kwargs": {...}}`` for a model timm cannot build. ``input_size`` is optional and only
  tells tools (the CLI) which example input the model is meant for.
* ``plans``: the plans of ``model.graphprune_plans``, in the order they were applied: channel
  plans (``graphprune.plan/2``) and block plans (``graphprune.blocks/1``, :mod:`graphprune.blocks`).
* ``tensors``: every ``state_dict`` entry: ``{name: {"shape": [...], "dtype": "float32"}}``,
  with ``"requires_grad"`` for parameters (a frozen backbone loads frozen).
* ``tied``: ``{alias: name}`` for entries that are the same tensor as another one; only
  ``name`` is in the safetensors file.
* ``weights``: file name, size in bytes and SHA-256 of ``model.safetensors``.
* ``record_sha256``: SHA-256 of the record's other fields (:func:`graphprune.io_record.record_digest`).

:func:`load` reads a directory someone else may have written, so it checks before it builds:
the record against its schema and bounds (:mod:`graphprune.io_record`: size, nesting depth,
types), the weights file's header (only the header is read) against the record's tensors, the
base model built on the meta device (no memory; refused past :data:`MAX_BASE_FACTOR` times the
stored elements) with every plan checked against it before it is expanded and applied
(:mod:`graphprune.io_replay`: edits sized like the tensors they cut, attribute patches only of
allowed size attributes whose current value is the recorded ``old``), then the record's hash
and the weights' SHA-256. Only then is the model built on the CPU, re-planned and loaded with
``strict=True``. Every damaged record raises :class:`ModelFileError` (the CLI exits 2).
Records written before ``record_sha256`` and ``requires_grad`` existed load as before (all
other checks apply; parameters come back trainable). The hash catches damage and edits by
tools that do not know it; it is not a signature. Nothing is ever unpickled: a pickle or
``torch.save`` file offered to :func:`load` is recognized by its first bytes and refused.

:func:`save` checks up front that the record rebuilds the model with the checks :func:`load`
applies (on the meta device, so no memory is spent), then writes the directory atomically
(:mod:`graphprune.io_staging`): both files go to a temporary directory next to the target,
are fsynced and renamed into place (files and directory get the modes the umask gives any
new file, e.g. 0644 and 0755); on any failure, a full disk included, it raises
:class:`ModelFileError` naming the path, nothing is left behind and an existing save is kept.
A save killed on the way leaves hidden ``.<name>.<pid>.*.tmp`` / ``.old`` directories; the
next save of that target removes them, and restores the previous save if the kill came
between the two renames (so does a :func:`load` of the then missing target).

timm architectures are rebuilt by name; other models by the factory named when saving
(``save(model, path, factory="torchvision.models:resnet18")``, see
:mod:`graphprune.factories`): torchvision's builders load anywhere, any other factory only
where the loader allows it by name (``load(path, allow_factories=[...])``), so a file never
chooses what code is imported. ``dropout``-like kwargs that do not change shapes are not
inferred; pass ``architecture=`` to record them.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io_record, io_replay, io_staging
from .api import HISTORY_ATTR
from .errors import InvalidArgumentError
from .groups import classifier_names
from .io_record import MODEL_FORMAT, RECORD_FILE, WEIGHTS_FILE, ModelFileError, ModelFileNotFoundError
from .io_staging import check_target
from .plan import Plan
from .removal import apply_plan_

__all__ = ["ARCHITECTURE_ATTR", "MODEL_FORMAT", "RECORD_FILE", "WEIGHTS_FILE", "Architecture", "ModelFileError",
           "ModelFileNotFoundError", "build_model", "check_target", "infer_architecture", "load", "save", "sniff"]

Edit = Any  # a channel Plan or a graphprune.blocks.BlockPlan: one entry of the structural history

ARCHITECTURE_ATTR = "graphprune_architecture"  # set by load(); save() reuses it
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_CHUNK_BYTES = 1 << 20
# timm.create_model arguments that would read weights or configs from files or the hub (maybe a pickle)
_FILE_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                          "pruned"})  # pruned=True: timm reads a channel file of its own
# timm.create_model arguments a record may not choose: where and in which precision the model is built
_PLACEMENT_KWARGS = frozenset({"device", "dtype"})
# load() builds a base model at most this many times the elements the weights file holds (plus the slack):
# pruning shrinks, but a base a thousand times the saved weights is a damaged or hostile record
MAX_BASE_FACTOR = 64
BASE_SLACK_NUMEL = 1 << 24


@dataclass(frozen=True)
class Architecture:
    """How to build the unpruned base model: a timm name, or a factory (:mod:`graphprune.factories`).

    Attributes:
        timm: a timm model name, e.g. ``"resnet18"``; ``None`` when ``factory`` builds it.
        kwargs: keyword arguments for ``timm.create_model`` or the factory (JSON values only).
        input_size: ``(C, H, W)`` the model is meant for, or ``None`` for timm's default.
        factory: instead of ``timm``: ``"module:function"``, e.g. ``"torchvision.models:resnet18"``.
    """

    timm: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None
    factory: str | None = None

    @property
    def name(self) -> str:
        """What builds the base, for messages: ``timm resnet18`` or ``torchvision.models:resnet18``."""
        return f"timm {self.timm}" if self.timm is not None else str(self.factory)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, the form :func:`save` takes as ``architecture=``.

        Example:
            >>> Architecture("resnet18", {"num_classes": 10}).to_dict()
            {'timm': 'resnet18', 'kwargs': {'num_classes': 10}}
        """
        out: dict[str, Any] = ({"timm": self.timm} if self.timm is not None else {"factory": self.factory})
        out["kwargs"] = dict(self.kwargs)
        if self.input_size is not None:
            out["input_size"] = list(self.input_size)
        return out

    @staticmethod
    def from_dict(data: object) -> Architecture:
        """Validate ``{"timm": name | "factory": "module:function", "kwargs": {...}, "input_size": [C, H, W]}``.

        Example:
            >>> Architecture.from_dict({"timm": "resnet18"}).kwargs
            {}
            >>> Architecture.from_dict({"factory": "torchvision.models:resnet18"}).name
            'torchvision.models:resnet18'
        """
        from . import factories

        named = [k for k in ("timm", "factory") if isinstance(data, Mapping) and k in data]
        if len(named) != 1 or (named == ["timm"] and (not isinstance(data["timm"], str) or not data["timm"])):
            raise InvalidArgumentError(f'architecture must look like {{"timm": "resnet18", "kwargs": {{...}}}} or '
                                       f'{{"factory": "torchvision.models:resnet18", "kwargs": {{...}}}}, got {data!r}')
        unknown = sorted(set(data) - {"timm", "factory", "kwargs", "input_size"})
        if unknown:
            raise InvalidArgumentError(f"architecture has unknown keys {unknown}; known: timm or factory, kwargs, "
                                       "input_size")
        factory = factories.check_name(data["factory"]) if named == ["factory"] else None
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise InvalidArgumentError(f"architecture kwargs must be a dict with string keys, got {kwargs!r}")
        refused = sorted(set(kwargs) & _FILE_KWARGS)
        if refused:
            raise InvalidArgumentError(f"architecture kwargs may not contain {refused}: the base is always built "
                                       "with pretrained=False from no file, and only the saved weights are loaded")
        placed = sorted(set(kwargs) & _PLACEMENT_KWARGS)
        if placed:
            raise InvalidArgumentError(f"architecture kwargs may not contain {placed}: the model is built on the CPU "
                                       "in float32, then given the saved dtypes; move it yourself after loading")
        if factory is not None:
            factories.check_kwargs(kwargs)
        try:
            kwargs = json.loads(json.dumps(dict(kwargs), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise InvalidArgumentError(f"architecture kwargs must be JSON values: {error}") from error
        size = data.get("input_size")
        if size is not None:
            if (not isinstance(size, (list, tuple)) or not size
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
                raise InvalidArgumentError(f"architecture input_size must be positive ints, got {size!r}")
            size = tuple(size)
        return Architecture(data.get("timm"), kwargs, size, factory)


def infer_architecture(model: nn.Module) -> Architecture:
    """Read a timm model's recipe: ``pretrained_cfg["architecture"]`` plus the shape-changing kwargs.

    Recorded are ``num_classes`` (from the classifier module, so a replaced head counts),
    ``in_chans`` and ``img_size`` when they differ from the pretrained config. Anything else
    that changes tensor shapes must be passed as ``save(..., architecture=...)``; :func:`save`
    verifies the recipe and says so when it does not rebuild the model.

    Raises:
        InvalidArgumentError: the model is not a timm model.

    Example:
        >>> import timm
        >>> infer_architecture(timm.create_model("resnet18", pretrained=False, num_classes=10)).to_dict()
        {'timm': 'resnet18', 'kwargs': {'num_classes': 10}}
    """
    recorded = getattr(model, ARCHITECTURE_ATTR, None)
    if recorded is not None:
        return Architecture.from_dict(recorded)
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if not name:
        raise InvalidArgumentError(
            f"{type(model).__name__} is not a timm model (no pretrained_cfg['architecture']), so graphprune cannot "
            'record how to rebuild it; name what built it, e.g. factory="torchvision.models:resnet18" (kwargs with '
            'architecture={"factory": ..., "kwargs": {...}}), or pass architecture={"timm": name, "kwargs": {...}}')
    kwargs: dict[str, Any] = {}
    num_classes = _num_classes(model)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    default_size = tuple(cfg.get("input_size") or ())
    input_size = None
    first_conv = cfg.get("first_conv")
    with contextlib.suppress(AttributeError, TypeError):
        in_chans = model.get_submodule(first_conv).in_channels
        if default_size and in_chans != default_size[0]:
            kwargs["in_chans"] = in_chans
            input_size = (in_chans, *default_size[1:])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and default_size and tuple(img_size) != tuple(default_size[1:]):
        height, width = (int(s) for s in img_size)
        kwargs["img_size"] = height if height == width else [height, width]
        input_size = (kwargs.get("in_chans", default_size[0]), height, width)
    return Architecture(name, kwargs, input_size)


def _num_classes(model: nn.Module) -> int | None:
    for name in classifier_names(model):
        head = model.get_submodule(name)
        if isinstance(head, nn.Linear):
            return head.out_features
        if isinstance(head, nn.modules.conv._ConvNd):
            return head.out_channels
        if isinstance(head, nn.Identity):
            return 0
    value = getattr(model, "num_classes", None)
    return value if isinstance(value, int) else None


def _constructor(architecture: Architecture, allow_factories: Iterable[str]) -> Callable[..., nn.Module]:
    """What builds the base: ``timm.create_model(name, pretrained=False, ...)`` or an allowed factory."""
    if architecture.factory is not None:
        from . import factories

        try:
            return factories.resolve(architecture.factory, allowed=allow_factories)
        except InvalidArgumentError as error:
            raise ModelFileError(str(error)) from error
    import timm

    if not timm.is_model(architecture.timm):
        close = difflib.get_close_matches(architecture.timm, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ModelFileError(f"unknown timm architecture {architecture.timm!r}{hint}")
    return lambda **kwargs: timm.create_model(architecture.timm, pretrained=False, **kwargs)


def build_model(architecture: Architecture, plans: tuple[Edit, ...] = (), *, device: str = "cpu",
                allow_factories: Iterable[str] = (), max_numel: int | None = None) -> nn.Module:
    """Create the base (``pretrained=False``, or the factory without weights) and re-apply ``plans`` in order.

    Args:
        architecture: the recipe.
        plans: plans to re-apply, oldest first (no tracing).
        device: ``"meta"`` builds shapes only (falls back to CPU for models that cannot).
        allow_factories: factory names that may be imported besides torchvision's builders
            (:func:`graphprune.factories.resolve`).
        max_numel: with ``device="meta"``, the most tensor elements the constructor may create,
            on the meta device or in the CPU fallback (:class:`~graphprune.io_replay.AllocationLimit`);
            ``None``: no bound.

    Raises:
        ModelFileError: unknown architecture or factory, one not allowed, kwargs the
            constructor refuses (whatever it raises), or a plan that does not fit.

    Example:
        >>> build_model(Architecture("resnet18", {"num_classes": 3}), device="meta").fc.out_features
        3
    """
    make = _constructor(architecture, allow_factories)
    kwargs = dict(architecture.kwargs)

    def limit() -> contextlib.AbstractContextManager:
        # counted on the meta device too: a kwarg like depth=10**9 would otherwise build modules forever
        return io_replay.AllocationLimit(max_numel) if max_numel is not None else contextlib.nullcontext()

    try:
        if device == "meta":
            try:
                with torch.device("meta"), limit():
                    model = make(**kwargs)
            except (RuntimeError, NotImplementedError):  # an __init__ that reads tensor values
                with limit():
                    model = make(**kwargs)
        else:
            model = make(**kwargs)
    except ModelFileError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a constructor raises on kwargs from a file is bad input
        raise ModelFileError(f"cannot create {architecture.name} with kwargs {_short(kwargs)}: "
                             f"{type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{architecture.name} returned a {type(model).__name__}, not an nn.Module")
    from .blocks import BlockPlan, apply_block_plan_

    for number, plan in enumerate(plans, start=1):
        try:
            with torch.device("meta") if device == "meta" else contextlib.nullcontext():  # proxies: shapes only
                if isinstance(plan, BlockPlan):
                    apply_block_plan_(model, plan, record=False)
                else:
                    apply_plan_(model, plan)
        except InvalidArgumentError as error:
            raise ModelFileError(f"plan {number} of {len(plans)} does not fit a fresh {architecture.name} "
                                 f"{_short(kwargs)}: {error}") from error
    return model


def _short(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- save


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_record(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every entry, and ``requires_grad`` of every parameter (a frozen backbone stays frozen)."""
    record = {}
    for name, tensor in state.items():
        entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
        if isinstance(tensor, nn.Parameter):
            entry["requires_grad"] = bool(tensor.requires_grad)
        record[name] = entry
    return record


def _shapes_only(record: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The record without dtypes: a rebuilt base is float32 until :func:`load` casts it."""
    return {k: {"shape": list(v["shape"]), "dtype": "any"} for k, v in record.items()}


def _split_tied(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (contiguous, sharing no memory) and ``{alias: stored name}`` for tied ones."""
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    used_storage: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen_views:
            tied[name] = seen_views[view]
            continue
        seen_views[view] = name
        data = tensor.cpu().contiguous()
        storage = data.untyped_storage().data_ptr()
        if data.numel() and storage in used_storage:  # overlapping views of one buffer
            data = data.clone()
        used_storage.add(data.untyped_storage().data_ptr())
        stored[name] = data
    return stored, tied


def parse_edit(text: str) -> Edit:
    """One history entry: a channel :class:`~graphprune.plan.Plan` or a block plan, by its ``format``."""
    from .blocks import BlockPlan, is_block_plan

    return BlockPlan.from_json(text) if is_block_plan(text) else Plan.from_json(text)


def _plans_of(model: nn.Module) -> tuple[Edit, ...]:
    history = getattr(model, HISTORY_ATTR, [])
    if not isinstance(history, (list, tuple)):
        raise InvalidArgumentError(f"model.{HISTORY_ATTR} must be a list of plan JSON strings")
    return tuple(parse_edit(text) for text in history)


def _shape_differences(expected: Mapping[str, Mapping[str, Any]], actual: Mapping[str, Mapping[str, Any]],
                       *, limit: int = 3) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing:
        problems.append(f"missing {missing[:limit]}{' ...' if len(missing) > limit else ''}")
    if extra:
        problems.append(f"unexpected {extra[:limit]}{' ...' if len(extra) > limit else ''}")
    changed = [f"{k}: {tuple(actual[k]['shape'])} {actual[k]['dtype']} instead of "
               f"{tuple(expected[k]['shape'])} {expected[k]['dtype']}"
               for k in expected if k in actual and dict(actual[k]) != dict(expected[k])]
    problems += changed[:limit] + (["..."] if len(changed) > limit else [])
    return problems


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~io_staging.umask()


def save(model: nn.Module, path: str | os.PathLike, *, architecture: Mapping[str, Any] | None = None,
         factory: str | None = None) -> Path:
    """Write ``model`` (pruned or not) to the directory ``path``: weights plus rebuild record.

    Args:
        model: a timm model, or one built by ``factory``, possibly pruned by graphprune (its
            ``graphprune_plans`` are saved).
        path: the directory to create; an existing graphprune save there is replaced
            atomically, an empty directory is filled, anything else there is refused.
        architecture: ``{"timm": name, "kwargs": {...}, "input_size": [C, H, W]}`` (or
            ``{"factory": ..., "kwargs": ...}``) to build the base; default: the record
            :func:`load` left on the model, else :func:`infer_architecture`.
        factory: shortcut for ``architecture={"factory": factory}``: the ``"module:function"``
            that built the model with no arguments, e.g. ``"torchvision.models:resnet18"``
            (see :mod:`graphprune.factories`; a factory other than torchvision's must be
            allowed again when loading).

    Returns:
        The directory written.

    Raises:
        InvalidArgumentError: not a timm model and no ``architecture``, or a bad one.
        ModelFileError: the record does not rebuild the model, or the path is not writable.

    Example:
        >>> import tempfile, timm, torch, graphprune as gp
        >>> model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> small = gp.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
        >>> folder = save(small, tempfile.mkdtemp() + "/resnet18-half")
        >>> sorted(p.name for p in folder.iterdir())
        ['graphprune.json', 'model.safetensors']
        >>> load(folder).fc.in_features
        256
        >>> import torchvision
        >>> net = gp.prune(torchvision.models.resnet18(num_classes=4), torch.randn(1, 3, 32, 32), ratio=0.5)
        >>> folder = save(net, tempfile.mkdtemp() + "/tv", architecture={"factory": "torchvision.models:resnet18",
        ...                                                               "kwargs": {"num_classes": 4}})
        >>> load(folder).fc.in_features
        256
    """
    target = Path(path)
    if factory is not None:
        if architecture is not None:
            raise InvalidArgumentError('give architecture= or factory=, not both (kwargs go in '
                                       'architecture={"factory": ..., "kwargs": {...}})')
        architecture = {"factory": factory}
    arch = Architecture.from_dict(architecture) if architecture is not None else infer_architecture(model)
    plans = _plans_of(model)
    state = model.state_dict(keep_vars=True)
    tensors = _tensor_record(state)
    unknown = sorted({entry["dtype"] for entry in tensors.values()} - set(io_record.DTYPES))
    if unknown:
        raise ModelFileError(f"cannot save to {target}: the model has tensors of dtype {unknown}; a saved model "
                             f"holds {', '.join(io_record.DTYPES)}")
    own = (arch.factory,) if arch.factory is not None else ()  # the caller named it: saving may import it
    plans_json = [json.loads(plan.to_json()) for plan in plans]
    rebuilt = build_model(arch, device="meta", allow_factories=own)
    io_replay.replay_on_meta(rebuilt, plans_json, f"cannot save to {target}")  # what load() will check
    rebuilt = rebuilt.state_dict()
    problems = _shape_differences(_shapes_only(tensors), _shapes_only(_tensor_record(rebuilt)))
    if problems:
        raise ModelFileError(
            f"cannot save: {arch.name} {dict(arch.kwargs)} with the model's {len(plans)} plan(s) re-applied does "
            f"not have this model's tensors ({'; '.join(problems)}); was the model changed outside graphprune "
            '(e.g. a new head)? pass architecture={"timm": ..., "kwargs": {...}} with the creation arguments')
    stored, tied = _split_tied(state)
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with io_staging.staging_dir(target) as staging:
        weights = staging / WEIGHTS_FILE
        try:
            save_file(stored, weights, metadata={"format": MODEL_FORMAT})
        except SafetensorError as error:  # e.g. the disk is full; the staging directory is removed
            raise ModelFileError(f"cannot save to {target}: writing the weights failed ({error})") from error
        weights.chmod(_file_mode())  # safetensors writes 0600 whatever the umask; a saved model is shareable
        _fsync_file(weights)
        record = {
            "format": MODEL_FORMAT,
            "architecture": arch.to_dict(),
            "plans": plans_json,
            "tensors": tensors,
            "tied": tied,
            "weights": {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": _sha256(weights)},
            "versions": _versions(),
        }
        record["record_sha256"] = io_record.record_digest(record)
        io_record.check_record(record, f"cannot save to {target}")  # never write what load() would refuse
        text = _format_record(record)
        if len(text.encode("utf-8")) > io_record.MAX_RECORD_BYTES:
            raise ModelFileError(f"cannot save to {target}: the record would have {len(text.encode('utf-8'))} bytes, "
                                 f"more than the {io_record.MAX_RECORD_BYTES} load() reads")
        with open(staging / RECORD_FILE, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        (staging / RECORD_FILE).chmod(_file_mode())
    return target


def _format_record(record: Mapping[str, Any]) -> str:
    """JSON with one line per tensor and per plan: readable, and diffs stay small."""

    def dump(value: object) -> str:
        return json.dumps(value, allow_nan=False)

    fields = []
    for key, value in record.items():
        if key in ("tensors", "tied") and value:
            text = "{\n" + ",\n".join(f"  {dump(k)}: {dump(v)}" for k, v in value.items()) + "\n }"
        elif key == "plans" and value:
            text = "[\n" + ",\n".join(f"  {dump(plan)}" for plan in value) + "\n ]"
        else:
            text = dump(value)
        fields.append(f" {dump(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _versions() -> dict[str, str]:
    import timm

    from . import __version__

    return {"graphprune": __version__, "torch": torch.__version__, "timm": timm.__version__}


# ----------------------------------------------------------------------------- load


def sniff(path: str | os.PathLike) -> str:
    """What a file is, from its first bytes: ``"safetensors"``, ``"pickle"``, ``"zip"`` (``torch.save``),
    ``"json"`` or ``"unknown"``. Reads at most 16 bytes; never unpickles.

    Example:
        >>> import pickle, tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
        ...     _ = f.write(pickle.dumps([1, 2]))
        >>> sniff(f.name)
        'pickle'
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER_BYTES:
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "json"
    return "unknown"


def _refuse_pickle(path: Path, kind: str) -> None:
    if kind in ("pickle", "zip"):
        raise ModelFileError(
            f"{path} is a {'pickle' if kind == 'pickle' else 'zip/torch.save (pickle inside)'} file; graphprune never "
            "unpickles files (loading a pickle can run arbitrary code). Load it yourself only if you trust it, "
            "then graphprune.save() it")


def _read_header(path: Path) -> dict[str, io_record.TensorSpec]:
    """The weights file's tensors, from its header alone; anything but a complete safetensors file is refused."""
    kind = sniff(path)
    _refuse_pickle(path, kind)
    if kind != "safetensors":
        raise ModelFileError(f"{path} is not a safetensors file")
    return io_record.read_header(path)


def _read_record(directory: Path) -> dict[str, Any]:
    """The record, parsed within bounds and checked against the schema (:mod:`graphprune.io_record`)."""
    record_path = directory / RECORD_FILE
    if not record_path.is_file():
        raise ModelFileNotFoundError(f"{directory} has no {RECORD_FILE}; is it a directory written by graphprune.save?")
    _refuse_pickle(record_path, sniff(record_path))
    size = record_path.stat().st_size
    if size > io_record.MAX_RECORD_BYTES:  # refused before reading it
        raise ModelFileError(f"{record_path} has {size} bytes; a record has at most {io_record.MAX_RECORD_BYTES}")
    record = io_record.parse_json(record_path.read_bytes(), str(record_path), max_bytes=io_record.MAX_RECORD_BYTES)
    return io_record.check_record(record, str(record_path))


def _numel(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() for t in tensors.values())


def _rebuild_on_meta(record: Mapping[str, Any], where: str, stored_numel: int,
                     allow_factories: Iterable[str]) -> tuple[Architecture, tuple[Edit, ...]]:
    """Build the record's model on the meta device, plan by plan, and check it is the weights file's model.

    Nothing is allocated: the base must be at most :data:`MAX_BASE_FACTOR` times the stored
    elements (plus :data:`BASE_SLACK_NUMEL`), every plan is checked before it is expanded
    (:func:`graphprune.io_replay.replay_on_meta`), and the result must have the record's tensors.
    """
    try:
        arch = Architecture.from_dict(record["architecture"])
    except InvalidArgumentError as error:
        raise ModelFileError(f"{where}: {error}") from error
    budget = MAX_BASE_FACTOR * stored_numel + BASE_SLACK_NUMEL
    model = build_model(arch, device="meta", allow_factories=allow_factories, max_numel=budget)
    base = _numel(model)
    if base > budget:
        raise ModelFileError(f"{where}: {arch.name} {_short(dict(arch.kwargs))} has {base} elements, more than "
                             f"{MAX_BASE_FACTOR} times the {stored_numel} that {WEIGHTS_FILE} holds; its kwargs do not "
                             "match the weights")
    plans = io_replay.replay_on_meta(model, record["plans"], where)
    problems = _shape_differences(_shapes_only(record["tensors"]), _shapes_only(_tensor_record(model.state_dict())))
    if problems:
        raise ModelFileError(f"{arch.name} with the {len(plans)} saved plan(s) re-applied does not match "
                             f"{RECORD_FILE} ({'; '.join(problems)}); was it saved with another timm version?")
    return arch, plans


def _resolve(path: Path) -> Path:
    """The save directory for ``path`` (the directory, or one of its two files)."""
    if not path.exists():
        io_staging.recover(path)  # a save killed between its two renames left the previous one aside
        if not path.exists():
            raise ModelFileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        return path
    if path.name in (RECORD_FILE, WEIGHTS_FILE) and io_staging.is_saved_model(path.parent):
        return path.parent
    kind = sniff(path)
    _refuse_pickle(path, kind)
    if kind == "safetensors":
        raise ModelFileError(f"{path} is a bare safetensors file with no architecture record; graphprune.load reads "
                             f"the directory graphprune.save writes ({RECORD_FILE} + {WEIGHTS_FILE})")
    raise ModelFileError(f"{path} is not a graphprune model directory")


def load(path: str | os.PathLike, *, allow_factories: Iterable[str] = ()) -> nn.Module:
    """Rebuild a model written by :func:`save`, in eval mode, without unpickling anything.

    Builds ``timm.create_model(name, pretrained=False, **kwargs)`` (or the record's factory),
    re-applies the saved plans in order, checks every tensor shape and dtype against
    ``graphprune.json``, then loads ``model.safetensors`` with ``strict=True``. The model's
    ``graphprune_plans`` and ``graphprune_architecture`` are restored, so it can be pruned
    again and saved again.

    Args:
        path: the directory (or either file in it).
        allow_factories: factory names (``"module:function"``) the record may name besides
            torchvision's model builders; any other factory is refused before it is imported.

    Raises:
        ModelFileNotFoundError: the path or one of its files does not exist.
        ModelFileError: a pickle or truncated file, a record that does not match the weights,
            or an unknown architecture.

    Example:
        >>> import tempfile, timm
        >>> folder = save(timm.create_model("resnet18", pretrained=False, num_classes=10), tempfile.mkdtemp() + "/r18")
        >>> load(folder).fc.out_features
        10
    """
    directory = _resolve(Path(path))
    record = _read_record(directory)
    where = str(directory / RECORD_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileNotFoundError(f"{directory} has {RECORD_FILE} but no {WEIGHTS_FILE}")
    header = _read_header(weights)
    io_record.check_header(record, header, where)
    stored_numel = sum(math.prod(spec.shape) for spec in header.values())
    arch, plans = _rebuild_on_meta(record, where, stored_numel, allow_factories)
    io_record.check_digest(record, where)
    expected = record["weights"]
    if weights.stat().st_size != expected["bytes"] or _sha256(weights) != expected["sha256"]:
        raise ModelFileError(f"{weights} is not the file {RECORD_FILE} was written with (size or SHA-256 differ); "
                             "save the model again with graphprune.save")
    # everything is checked: from here on only what the weights file holds is allocated
    tensors_record, tied = record["tensors"], record["tied"]
    model = build_model(arch, plans, allow_factories=allow_factories)
    live = model.state_dict(keep_vars=True)
    problems = _shape_differences(_shapes_only(tensors_record), _shapes_only(_tensor_record(live)))
    if problems:
        raise ModelFileError(f"{arch.name} with the {len(plans)} saved plan(s) re-applied does not match "
                             f"{RECORD_FILE} ({'; '.join(problems)}); was it saved with another timm version?")
    with torch.no_grad():
        for name, tensor in live.items():  # a model saved in half precision comes back in half precision
            dtype = getattr(torch, tensors_record[name]["dtype"])
            if tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"cannot read {weights}: {error}") from error
    full = dict(stored) | {alias: stored[name] for alias, name in tied.items()}
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"cannot load {weights}: {error}") from error
    for name, tensor in live.items():
        wanted = tensors_record[name].get("requires_grad")
        if isinstance(tensor, nn.Parameter) and wanted is not None:
            tensor.requires_grad_(wanted)
    setattr(model, HISTORY_ATTR, [plan.to_json() for plan in plans])
    setattr(model, ARCHITECTURE_ATTR, arch.to_dict())
    return model.eval()
