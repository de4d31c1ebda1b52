"""Whether a model or dataset named on the command line can be had: a local folder, or a reachable hub."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import RecipeError

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "owner/name"


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path: not a hub id, or "a/b" whose folder ``a`` exists here."""
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def require_local_or_reachable(name_or_path: str, flag: str, offline_hint: str) -> None:
    """Fail in seconds when ``name_or_path`` is neither a local folder nor a hub id the hub can give: a path
    that does not exist is said to be one, an unreachable hub comes with the offline alternative."""
    if Path(name_or_path).exists():
        return
    if looks_like_path(name_or_path):
        raise RecipeError(f"{flag} {name_or_path}: no such folder.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError as error:
            reason = f"the hub ({host}) cannot be reached: {error}"
    raise RecipeError(
        f"{flag} {name_or_path!r} is not a local folder and {reason}. To run offline, point {flag} at a local "
        f"folder instead: {offline_hint}"
    )


def require_folder(path: str | Path, flag: str, hint: str = "") -> Path:
    """``path`` as a Path, when it is a folder; otherwise an error that names the flag."""
    path = Path(path)
    if not path.is_dir():
        raise RecipeError(f"{flag} {path}: {'not a folder' if path.exists() else 'no such folder'}.{hint}")
    return path
