"""What a file is and whether its bytes can be trusted: sniffing, pickle refusal, digests, fsync.

Nothing here unpickles: :func:`sniff` reads at most 16 bytes, and a pickle or ``torch.save``
file is refused by :func:`refuse_pickle` before anything parses it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from . import io_record, io_staging
from .io_record import ModelFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
CHUNK_BYTES = 1 << 20


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (before a rename makes them the save)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sha256_of(path: Path) -> str:
    """SHA-256 of the file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~io_staging.umask()


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
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES:
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "json"
    return "unknown"


def refuse_pickle(path: Path, kind: str) -> None:
    """Raise :class:`ModelFileError` for a pickle or zip (``torch.save``) file: ``kind`` is :func:`sniff`'s answer."""
    if kind in ("pickle", "zip"):
        raise ModelFileError(
            f"{path} is a {'pickle' if kind == 'pickle' else 'zip/torch.save (pickle inside)'} file; graphprune never "
            "unpickles files (loading a pickle can run arbitrary code). Load it yourself only if you trust it, "
            "then graphprune.save() it")


def read_weights_header(path: Path) -> dict[str, io_record.TensorSpec]:
    """The weights file's tensors, from its header alone; anything but a complete safetensors file is refused."""
    kind = sniff(path)
    refuse_pickle(path, kind)
    if kind != "safetensors":
        raise ModelFileError(f"{path} is not a safetensors file")
    return io_record.read_header(path)
