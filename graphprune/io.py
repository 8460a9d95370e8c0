# Over 350 lines: 53 are the file format's specification; save and load are one contract, read side by side.
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

timm architectures are rebuilt by name (:mod:`graphprune.io_architecture`); other models by
the factory named when saving (``save(model, path, factory="torchvision.models:resnet18")``, see
:mod:`graphprune.factories`): torchvision's builders load anywhere, any other factory only
where the loader allows it by name (``load(path, allow_factories=[...])``), so a file never
chooses what code is imported. ``dropout``-like kwargs that do not change shapes are not
inferred; pass ``architecture=`` to record them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io_record, io_replay, io_staging
from .blocks import BlockPlan, is_block_plan
from .errors import InvalidArgumentError
from .history import plan_texts, set_history
from .io_architecture import ARCHITECTURE_ATTR, Architecture, Edit, short_repr, build_model, infer_architecture
from .io_record import MODEL_FORMAT, RECORD_FILE, WEIGHTS_FILE, ModelFileError, ModelFileNotFoundError
from .io_files import file_mode, fsync_file, read_weights_header, refuse_pickle, sha256_of, sniff
from .io_staging import check_target
from .io_tensors import shape_differences, shapes_only, split_tied, tensor_record
from .plan import Plan
from .sparsity.kernel_plan import KernelPlan, is_kernel_plan

__all__ = ["ARCHITECTURE_ATTR", "MODEL_FORMAT", "RECORD_FILE", "WEIGHTS_FILE", "Architecture", "ModelFileError",
           "ModelFileNotFoundError", "build_model", "check_target", "infer_architecture", "load", "save", "sniff"]

# load() builds a base model at most this many times the elements the weights file holds (plus the slack):
# pruning shrinks, but a base a thousand times the saved weights is a damaged or hostile record
MAX_BASE_FACTOR = 64
BASE_SLACK_NUMEL = 1 << 24


# ----------------------------------------------------------------------------- save


def parse_edit(text: str) -> Edit:
    """One history entry: a channel :class:`~graphprune.plan.Plan`, a block plan or a kernel plan, by its ``format``."""
    if is_kernel_plan(text):
        return KernelPlan.from_json(text)
    return BlockPlan.from_json(text) if is_block_plan(text) else Plan.from_json(text)


def _plans_of(model: nn.Module) -> tuple[Edit, ...]:
    return tuple(parse_edit(text) for text in plan_texts(model))


def _checked_tensors(state: Mapping[str, torch.Tensor], arch: Architecture, plans_json: list[dict[str, Any]],
                     target: Path) -> dict[str, dict[str, Any]]:
    """The tensor record of ``state``, once the record is known to rebuild it the way :func:`load` will.

    Refused: ``torch.nn.utils.prune`` masks still in place, a dtype a save cannot hold, and an
    architecture + plans that rebuild (on the meta device) to other tensors.
    """
    masked = [name[:-len("_orig")] for name in state if name.endswith("_orig") and name[:-5] + "_mask" in state]
    if masked:  # torch.nn.utils.prune reparametrizations: the base model has no weight_orig / weight_mask
        raise ModelFileError(f"cannot save to {target}: {masked[:3]}{' ...' if len(masked) > 3 else ''} still carry "
                             "torch.nn.utils.prune masks; graphprune.sparsity.make_permanent_(model) folds them into "
                             "the weights first")
    tensors = tensor_record(state)
    unknown = sorted({entry["dtype"] for entry in tensors.values()} - set(io_record.DTYPES))
    if unknown:
        raise ModelFileError(f"cannot save to {target}: the model has tensors of dtype {unknown}; a saved model "
                             f"holds {', '.join(io_record.DTYPES)}")
    own = (arch.factory,) if arch.factory is not None else ()  # the caller named it: saving may import it
    rebuilt = build_model(arch, device="meta", allow_factories=own)
    io_replay.replay_on_meta(rebuilt, plans_json, f"cannot save to {target}")  # what load() will check
    rebuilt = rebuilt.state_dict()
    problems = shape_differences(shapes_only(tensors), shapes_only(tensor_record(rebuilt)))
    if problems:
        raise ModelFileError(
            f"cannot save: {arch.name} {dict(arch.kwargs)} with the model's {len(plans_json)} plan(s) re-applied does "
            f"not have this model's tensors ({'; '.join(problems)}); was the model changed outside graphprune "
            '(e.g. a new head)? pass architecture={"timm": ..., "kwargs": {...}} with the creation arguments')
    return tensors


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
    plans_json = [json.loads(plan.to_json()) for plan in _plans_of(model)]
    state = model.state_dict(keep_vars=True)
    tensors = _checked_tensors(state, arch, plans_json, target)
    stored, tied = split_tied(state)
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with io_staging.staging_dir(target) as staging:
        weights = staging / WEIGHTS_FILE
        try:
            save_file(stored, weights, metadata={"format": MODEL_FORMAT})
        except SafetensorError as error:  # e.g. the disk is full; the staging directory is removed
            raise ModelFileError(f"cannot save to {target}: writing the weights failed ({error})") from error
        weights.chmod(file_mode())  # safetensors writes 0600 whatever the umask; a saved model is shareable
        fsync_file(weights)
        record = {
            "format": MODEL_FORMAT,
            "architecture": arch.to_dict(),
            "plans": plans_json,
            "tensors": tensors,
            "tied": tied,
            "weights": {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": sha256_of(weights)},
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
        (staging / RECORD_FILE).chmod(file_mode())
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


def _read_record(directory: Path) -> dict[str, Any]:
    """The record, parsed within bounds and checked against the schema (:mod:`graphprune.io_record`)."""
    record_path = directory / RECORD_FILE
    if not record_path.is_file():
        raise ModelFileNotFoundError(f"{directory} has no {RECORD_FILE}; is it a directory written by graphprune.save?")
    refuse_pickle(record_path, sniff(record_path))
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
        raise ModelFileError(f"{where}: {arch.name} {short_repr(dict(arch.kwargs))} has {base} elements, more than "
                             f"{MAX_BASE_FACTOR} times the {stored_numel} that {WEIGHTS_FILE} holds; its kwargs do not "
                             "match the weights")
    plans = io_replay.replay_on_meta(model, record["plans"], where)
    problems = shape_differences(shapes_only(record["tensors"]), shapes_only(tensor_record(model.state_dict())))
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
    refuse_pickle(path, kind)
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
    header = read_weights_header(weights)
    io_record.check_header(record, header, where)
    stored_numel = sum(math.prod(spec.shape) for spec in header.values())
    arch, plans = _rebuild_on_meta(record, where, stored_numel, allow_factories)
    io_record.check_digest(record, where)
    expected = record["weights"]
    if weights.stat().st_size != expected["bytes"] or sha256_of(weights) != expected["sha256"]:
        raise ModelFileError(f"{weights} is not the file {RECORD_FILE} was written with (size or SHA-256 differ); "
                             "save the model again with graphprune.save")
    # everything is checked: from here on only what the weights file holds is allocated
    tensors_record, tied = record["tensors"], record["tied"]
    model = build_model(arch, plans, allow_factories=allow_factories)
    live = model.state_dict(keep_vars=True)
    problems = shape_differences(shapes_only(tensors_record), shapes_only(tensor_record(live)))
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
    set_history(model, plans)
    setattr(model, ARCHITECTURE_ATTR, arch.to_dict())
    return model.eval()
