"""Where the offline test and benchmark assets live.

The data (image datasets and pretrained weights, see ``../shared/data/MANIFEST.json``)
is never part of the repo. It sits beside the repo root as ``../shared/data``, or wherever
the ``GRAPHPRUNE_DATA`` environment variable points.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "GRAPHPRUNE_DATA"

# graphprune/assets/paths.py -> parents[0] = assets, [1] = graphprune, [2] = repo root.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """Return the directory that holds the shared offline data.

    The directory is ``$GRAPHPRUNE_DATA`` when that variable is set and non-empty,
    otherwise ``<repo root>/../shared/data``. The path is not checked for existence;
    use :func:`require_shared_data` for that. When graphprune is installed as a package
    (not run from a checkout), the default points next to ``site-packages``, so set
    ``GRAPHPRUNE_DATA``.

    Returns:
        Absolute path of the shared data directory.

    Example:
        >>> from graphprune.assets import shared_data_dir
        >>> shared_data_dir().is_absolute()
        True
    """
    from_env = os.environ.get(DATA_ENV_VAR, "").strip()
    if from_env:
        return Path(from_env).expanduser().resolve()
    return (_REPO_ROOT.parent / "shared" / "data").resolve()


def require_shared_data(*parts: str) -> Path:
    """Return a path inside the shared data directory, failing loudly if it is missing.

    Args:
        *parts: Path components below the data directory, e.g. ``"flowers17", "val"``.

    Returns:
        The existing path ``shared_data_dir() / parts[0] / parts[1] / ...``.

    Raises:
        FileNotFoundError: The path does not exist. The message names the expected path
            and the ``GRAPHPRUNE_DATA`` environment variable.

    Example:
        >>> from graphprune.assets import require_shared_data
        >>> require_shared_data("weights", "resnet_cifar10").is_dir()  # doctest: +SKIP
        True
    """
    base = shared_data_dir()
    path = base.joinpath(*parts)
    if not path.exists():
        source = f"${DATA_ENV_VAR}" if os.environ.get(DATA_ENV_VAR, "").strip() else (
            f"the default <repo root>/../shared/data (${DATA_ENV_VAR} is not set)"
        )
        raise FileNotFoundError(
            f"graphprune shared data not found: expected {path} "
            f"(data dir {base}, from {source}). "
            f"Set {DATA_ENV_VAR} to the directory that holds MANIFEST.json, "
            "or place the data at ../shared/data next to the repo root."
        )
    return path
