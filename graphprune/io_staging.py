"""Writing a save directory atomically, and recovering from a save that was killed.

:func:`staging_dir` gives :func:`graphprune.io.save` a hidden directory next to the target,
``.<name>.<pid>.<random>.tmp``; when the block succeeds it is renamed onto the target. An
existing save is first renamed into ``.<name>.<pid>.<random>.old/old`` and removed once the
new one is in place, so there is always a complete save under one of the two names.

A save killed on the way (``kill -9``, power loss) can leave these hidden directories
behind. :func:`recover` cleans up after the saves of one target whose process is gone
(the ``<pid>`` in the name no longer runs; a directory of a save still running is left
alone): staging directories are removed, and a previous save left in a ``.old`` directory
is moved back to the target if the target is missing (a crash between the two renames),
else removed. :func:`staging_dir` calls it first, and :func:`graphprune.io.load` calls it
when the directory it is asked for is missing. (Whether a process is gone is asked of this
machine: on a folder shared between machines, do not save the same target from two of them
at once.)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .io_record import RECORD_FILE, ModelFileError

_RANDOM = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp puts between prefix and suffix


def is_saved_model(path: Path) -> bool:
    """Whether ``path`` is a directory holding a graphprune record.

    Example:
        >>> is_saved_model(Path("/nonexistent"))
        False
    """
    return path.is_dir() and (path / RECORD_FILE).is_file()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True  # another thread of this process may be saving
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def leftovers(target: Path) -> list[tuple[Path, str, int | None]]:
    """Hidden ``.tmp`` / ``.old`` directories of saves of ``target``: ``(path, kind, pid)``.

    ``pid`` is ``None`` for the names older graphprune versions wrote (no pid in them).

    Example:
        >>> leftovers(Path(tempfile.mkdtemp()) / "model")
        []
    """
    prefix = f".{target.name}."
    found = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            name = entry.name
            if not name.startswith(prefix) or not name.endswith((".tmp", ".old")) or not entry.is_dir():
                continue
            middle = name[len(prefix):-4].split(".")
            if len(middle) == 2 and middle[0].isdigit() and _RANDOM.fullmatch(middle[1]):
                found.append((entry, name[-3:], int(middle[0])))
            elif len(middle) == 1 and _RANDOM.fullmatch(middle[0]):
                found.append((entry, name[-3:], None))
    return sorted(found)


def recover(target: Path) -> None:
    """Clean up after killed saves of ``target`` (see the module docstring).

    Raises:
        ModelFileError: the previous save could not be moved back (e.g. a read-only folder).

    Example:
        >>> recover(Path(tempfile.mkdtemp()) / "model")  # nothing to do
    """
    stale = [(path, kind) for path, kind, pid in leftovers(target) if not _alive(pid)]
    for path, kind in stale:
        if kind == "old":
            previous = path / "old"
            if not target.exists() and not target.is_symlink() and is_saved_model(previous):
                try:
                    os.replace(previous, target)  # the crash came between the two renames
                except OSError as error:
                    raise ModelFileError(f"{target} is missing after an interrupted save, and its previous save in "
                                         f"{previous} cannot be moved back ({error.strerror}); move it yourself"
                                         ) from error
            shutil.rmtree(path, ignore_errors=True)
    for path, kind in stale:
        if kind == "tmp":
            shutil.rmtree(path, ignore_errors=True)


def check_target(path: str | os.PathLike) -> None:
    """Fail early unless :func:`graphprune.io.save` may write ``path``: its parent is a directory
    and ``path`` is new, an empty directory, or an earlier save (which is then replaced).

    Raises:
        ModelFileError: saying which of the two does not hold.

    Example:
        >>> check_target(Path(tempfile.mkdtemp()) / "new-model")
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ModelFileError(f"cannot save to {target}: the parent directory {parent} {what}")
    if target.exists() and not is_saved_model(target) and not _is_empty_dir(target):
        kind = "directory" if target.is_dir() else "file"
        raise ModelFileError(f"cannot save to {target}: it is an existing {kind} that is not a graphprune save; "
                             "choose a new path or remove it")


def fsync_dir(path: Path) -> None:
    """``fsync`` a directory, where the platform can open one.

    Example:
        >>> fsync_dir(Path(tempfile.gettempdir()))
    """
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def umask() -> int:
    """The process's umask (read without changing it for longer than one call).

    Example:
        >>> 0 <= umask() <= 0o777
        True
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temporary directory next to ``target``; renamed onto it if the block succeeds, else removed.

    Raises:
        ModelFileError: the target is not writable, or writing failed (naming the path).

    Example:
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with staging_dir(target) as staging:
        ...     _ = (staging / RECORD_FILE).write_text("{}")
        >>> [p.name for p in target.parent.iterdir()]
        ['model']
    """
    check_target(target)
    recover(target)
    parent = target.parent
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    except OSError as error:
        raise ModelFileError(f"cannot save to {target}: cannot write in {parent} ({error.strerror})") from error
    try:
        staging.chmod(0o777 & ~umask())  # mkdtemp makes it private; a saved model is an ordinary directory
        yield staging
        fsync_dir(staging)
        if target.exists():  # keep the old save until the new one is in place
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=parent))
            os.replace(target, backup / "old")
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(backup / "old", target)
                raise
            finally:
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_dir(parent)
    except OSError as error:
        raise ModelFileError(f"cannot save to {target}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
