# Over 350 lines: every bound a hostile record is checked against, in one place (one schema, one reader).
"""The saved-model record (``graphprune.json``) and the weights file's header: read, bounded and checked.

:func:`graphprune.io.load` reads a directory someone else may have written. Everything in it
is checked here *before* anything is built or allocated, and every failure is a
:class:`ModelFileError` naming the file and the field:

* the record is at most :data:`MAX_RECORD_BYTES` (checked before it is read), nested at most
  :data:`MAX_DEPTH` deep, has no duplicate keys, no ``NaN``;
* every field has the type and range of the schema below (:func:`check_record`);
* the safetensors header (read alone: 8 bytes of length, then that much JSON, at most
  :data:`MAX_HEADER_BYTES`) describes tensors that exactly fill the file
  (:func:`read_header`), and they are exactly the record's tensors: same names, shapes and
  dtypes (:func:`check_header`);
* the record's own SHA-256 (``record_sha256``, over the canonical JSON of every other field)
  matches (:func:`record_digest`). Records written before the hash existed have none; they are
  still accepted, with every other check applied. The hash detects damage and edits by tools
  that do not know about it; it is not a signature: whoever can write the file can recompute it.

Schema (``"format": "graphprune.model/1"``)::

    architecture   {"timm": str | "factory": "module:function", "kwargs": {...}, "input_size": [int]}
    plans          [plan, ...]                      at most MAX_PLANS, each a JSON object
    tensors        {name: {"shape": [int >= 0], "dtype": str, "requires_grad": bool}}
    tied           {alias: stored name}             both in tensors, same shape and dtype
    weights        {"file": "model.safetensors", "bytes": int, "sha256": 64 hex digits}
    versions       {str: str}
    record_sha256  64 hex digits                    optional (absent in older records)

``requires_grad`` is recorded for parameters only (buffers have none) and is optional too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GraphpruneError

MODEL_FORMAT = "graphprune.model/1"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "graphprune.json"
MAX_RECORD_BYTES = 16 * 1024 * 1024  # a record lists tensors and index runs: megabytes for the largest models
MAX_HEADER_BYTES = 16 * 1024 * 1024  # the safetensors header: ~100 bytes per tensor
MAX_DEPTH = 32  # a record nests 7 deep (record > plans > plan > edits > edit > keep > run)
MAX_PLANS = 256
MAX_DIMS = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEYS = ("format", "architecture", "plans", "tensors", "tied", "weights", "versions", "record_sha256")
_REQUIRED = ("architecture", "plans", "tensors", "tied", "weights")
# torch dtype name (as the record writes it) -> safetensors dtype code and bytes per element
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
    "bool": ("BOOL", 1), "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
    "uint16": ("U16", 2), "uint32": ("U32", 4), "uint64": ("U64", 8),
}
_ITEM_BYTES = {code: size for code, size in DTYPES.values()}


class ModelFileError(GraphpruneError):
    """A saved model cannot be written or read (bad path, corrupt or mismatched files, pickle offered)."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """The saved model, or one of its two files, does not exist."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the safetensors header describes it.

    Attributes:
        dtype: the safetensors code, e.g. ``"F32"``.
        shape: its shape.
        nbytes: its size in the file.
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


# ----------------------------------------------------------------------------- bounded JSON


def nesting_depth(value: object) -> int:
    """How deep lists and dicts nest in a parsed JSON value (a scalar is 0), without recursion.

    Example:
        >>> nesting_depth({"a": [[1], "[[["], "b": {}})
        3
    """
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {twice!r}")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, what: str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted bytes: the size bounded first, then the nesting depth (json's own
    scanner stops cleanly at the interpreter's recursion limit), no duplicate keys, no NaN.

    Raises:
        ModelFileError: naming ``what`` and the problem.

    Example:
        >>> parse_json(b'{"a": [1, 2]}', "x.json", max_bytes=100)
        {'a': [1, 2]}
        >>> parse_json(b'[' * 100 + b']' * 100, "x.json", max_bytes=1000)
        Traceback (most recent call last):
        ...
        graphprune.io_record.ModelFileError: x.json nests 100 levels deep; a graphprune file nests at most 32
    """
    if len(raw) > max_bytes:
        raise ModelFileError(f"{what} has {len(raw)} bytes; a graphprune file of this kind has at most {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelFileError(f"{what} is not UTF-8 text: {error}") from error
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError as error:  # json's scanner stops at the interpreter's recursion limit, cleanly
        raise ModelFileError(f"{what} nests deeper than {sys.getrecursionlimit()} levels; a graphprune file nests at "
                             f"most {max_depth}") from error
    except ValueError as error:
        raise ModelFileError(f"{what} is not valid JSON: {error}") from error
    depth = nesting_depth(value)
    if depth > max_depth:
        raise ModelFileError(f"{what} nests {depth} levels deep; a graphprune file nests at most {max_depth}")
    return value


# ----------------------------------------------------------------------------- the record's schema


def _fail(where: str, message: str) -> ModelFileError:
    return ModelFileError(f"{where}: {message}")


def _is_int(value: object, low: int = 0) -> bool:
    return type(value) is int and value >= low


def check_shape(value: object) -> tuple[int, ...] | None:
    """``value`` as a shape if it is a list of at most :data:`MAX_DIMS` ints >= 0, else ``None``.

    Example:
        >>> check_shape([3, 4]), check_shape([-1]), check_shape("3")
        ((3, 4), None, None)
    """
    if isinstance(value, list) and len(value) <= MAX_DIMS and all(_is_int(s) for s in value):
        return tuple(value)
    return None


def _check_tensors(tensors: Mapping[str, Any], where: str) -> None:
    for name, entry in tensors.items():
        if not name:
            raise _fail(where, "a tensor has an empty name")
        if not isinstance(entry, dict):
            raise _fail(where, f"tensor {name!r} must be an object with shape and dtype, got {entry!r:.80}")
        unknown = sorted(set(entry) - {"shape", "dtype", "requires_grad"})
        if unknown or "shape" not in entry or "dtype" not in entry:
            raise _fail(where, f"tensor {name!r} must have shape and dtype (and optionally requires_grad), has "
                               f"{sorted(entry)}")
        if check_shape(entry["shape"]) is None:
            raise _fail(where, f"tensor {name!r} has shape {entry['shape']!r:.80}; a shape is a list of ints >= 0")
        if entry["dtype"] not in DTYPES:
            raise _fail(where, f"tensor {name!r} has dtype {entry['dtype']!r:.40}; known: {', '.join(DTYPES)}")
        if "requires_grad" in entry and not isinstance(entry["requires_grad"], bool):
            raise _fail(where, f"tensor {name!r} has requires_grad {entry['requires_grad']!r:.40}, not true/false")


def _check_tied(tied: Mapping[str, Any], tensors: Mapping[str, Any], where: str) -> None:
    for alias, name in tied.items():
        if not isinstance(name, str) or alias not in tensors or name not in tensors or name in tied or alias == name:
            raise _fail(where, f"tied entry {alias!r:.80}: {name!r:.80} must name two different tensors of the "
                               "record, the second one stored")
        if tensors[alias] != tensors[name]:
            raise _fail(where, f"tied tensors {alias!r} and {name!r} differ in shape or dtype")


def check_record(record: object, where: str) -> dict[str, Any]:
    """``record`` if it has the schema of the module docstring, else :class:`ModelFileError`.

    Only the types and ranges are checked here; what the architecture and plans build is
    checked against the weights file later (on the meta device).

    Example:
        >>> check_record({"format": MODEL_FORMAT, "architecture": {}, "plans": [5], "tensors": {}, "tied": {},
        ...               "weights": {}}, "m/graphprune.json")
        Traceback (most recent call last):
        ...
        graphprune.io_record.ModelFileError: m/graphprune.json: plan 1 must be a JSON object, got 5
    """
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ModelFileError(f"{where} has format {found!r:.80}; this graphprune reads {MODEL_FORMAT!r}")
    unknown = sorted(set(record) - set(_KEYS))
    if unknown:
        raise _fail(where, f"unknown fields {unknown}; a record has {', '.join(_KEYS)}")
    for key, kind in (("architecture", dict), ("plans", list), ("tensors", dict), ("tied", dict), ("weights", dict)):
        if not isinstance(record.get(key), kind):
            raise _fail(where, f"field {key!r} is missing or not a {kind.__name__}")
    if len(record["plans"]) > MAX_PLANS:
        raise _fail(where, f"{len(record['plans'])} plans; a record holds at most {MAX_PLANS}")
    for number, plan in enumerate(record["plans"], start=1):
        if not isinstance(plan, dict):
            raise _fail(where, f"plan {number} must be a JSON object, got {plan!r:.80}")
    _check_tensors(record["tensors"], where)
    _check_tied(record["tied"], record["tensors"], where)
    weights = record["weights"]
    if (set(weights) != {"file", "bytes", "sha256"} or weights["file"] != WEIGHTS_FILE
            or not _is_int(weights["bytes"], 8) or not isinstance(weights["sha256"], str)
            or not _SHA256.fullmatch(weights["sha256"])):
        raise _fail(where, f'weights must be {{"file": "{WEIGHTS_FILE}", "bytes": int, "sha256": hex}}, '
                           f"got {weights!r:.200}")
    versions = record.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise _fail(where, f"versions must map names to version strings, got {versions!r:.80}")
    digest = record.get("record_sha256")
    if digest is not None and (not isinstance(digest, str) or not _SHA256.fullmatch(digest)):
        raise _fail(where, f"record_sha256 must be 64 hex digits, got {digest!r:.80}")
    return record


def record_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no spaces), ``record_sha256`` left out.

    Example:
        >>> record_digest({"a": 1, "record_sha256": "x"}) == record_digest({"a": 1})
        True
    """
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_digest(record: Mapping[str, Any], where: str) -> None:
    """Refuse a record whose ``record_sha256`` does not match its content (none: an older record, accepted).

    Example:
        >>> record = {"format": MODEL_FORMAT}
        >>> check_digest(record | {"record_sha256": record_digest(record)}, "r.json")
    """
    digest = record.get("record_sha256")
    if digest is not None and digest != record_digest(record):
        raise _fail(where, "the record was changed after it was saved (its record_sha256 does not match its "
                           "content); save the model again with graphprune.save")


# ----------------------------------------------------------------------------- the weights file's header


def read_header(path: Path) -> dict[str, TensorSpec]:
    """The tensors a safetensors file holds, from its header alone (the data is not read).

    The header must be at most :data:`MAX_HEADER_BYTES`, and its tensors must tile the data
    section exactly: each one's byte range is ``numel * itemsize``, they follow each other
    without gaps or overlaps, and the file ends where the last one does.

    Raises:
        ModelFileError: a truncated or malformed file, naming what is wrong.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_file({"w": torch.zeros(2, 3)}, path)
        >>> read_header(path)
        {'w': TensorSpec(dtype='F32', shape=(2, 3), nbytes=24)}
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path} is truncated: {size} bytes, less than a safetensors header")
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
            problem = "truncated" if 8 + header_bytes > size and header_bytes <= MAX_HEADER_BYTES else "corrupt"
            raise ModelFileError(f"{path} is {problem}: its header claims {header_bytes} bytes (the file has {size}, "
                                 f"a header at most {MAX_HEADER_BYTES})")
        raw = handle.read(header_bytes)
    header = parse_json(raw, f"{path} (safetensors header)", max_bytes=MAX_HEADER_BYTES, max_depth=4)
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} has a corrupt safetensors header: not a JSON object")
    specs: dict[str, TensorSpec] = {}
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = check_shape(entry.get("shape")) if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if (shape is None or dtype not in _ITEM_BYTES or not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise ModelFileError(f"{path} has a corrupt safetensors header: entry {name!r:.80} is {entry!r:.120}")
        nbytes = math.prod(shape) * _ITEM_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise ModelFileError(f"{path} has a corrupt safetensors header: {name!r} {dtype}{list(shape)} needs "
                                 f"{nbytes} bytes, its offsets {offsets} give {offsets[1] - offsets[0]}")
        specs[name] = TensorSpec(dtype, shape, nbytes)
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            raise ModelFileError(f"{path} has a corrupt safetensors header: tensor {name!r} starts at byte {start}, "
                                 f"the previous one ends at {end}")
        end = stop
    if 8 + header_bytes + end != size:
        what = "truncated" if size < 8 + header_bytes + end else "not what its header describes"
        raise ModelFileError(f"{path} is {what}: {size} bytes, its header describes {8 + header_bytes + end}")
    return specs


def check_header(record: Mapping[str, Any], header: Mapping[str, TensorSpec], where: str) -> None:
    """The stored tensors (the record's tensors less the tied aliases) are exactly the header's.

    Raises:
        ModelFileError: ``"<record> does not match <weights>: ..."`` with the first differences.

    Example:
        >>> record = {"tensors": {"w": {"shape": [2, 3], "dtype": "float32"}}, "tied": {}}
        >>> check_header(record, {"w": TensorSpec("F32", (2, 3), 24)}, "m")
    """
    tensors, tied = record["tensors"], record["tied"]
    stored = [k for k in tensors if k not in tied]
    missing = [k for k in stored if k not in header]
    extra = [k for k in header if k not in tensors or k in tied]
    changed = [f"{k}: {list(header[k].shape)} {header[k].dtype} in the file, {tensors[k]['shape']} "
               f"{tensors[k]['dtype']} in the record" for k in stored if k in header
               and (list(header[k].shape) != tensors[k]["shape"] or header[k].dtype != DTYPES[tensors[k]["dtype"]][0])]
    problems = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else [])
    problems += changed[:3] + (["..."] if len(changed) > 3 else [])
    if problems:
        raise ModelFileError(f"{where}: {RECORD_FILE} does not match {WEIGHTS_FILE}: {'; '.join(problems)}")


def stored_bytes(header: Mapping[str, TensorSpec]) -> int:
    """Bytes of tensor data the weights file holds.

    Example:
        >>> stored_bytes({"w": TensorSpec("F32", (2, 3), 24)})
        24
    """
    return sum(spec.nbytes for spec in header.values())
