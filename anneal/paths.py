"""Where the package's bundled files are, in a source checkout, an editable install or a wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import anneal


def package_root() -> Path:
    """Folder holding the `anneal` package (site-packages, or the repo root in a checkout);
    bundled relative paths such as `anneal/assets/tiny-stable` resolve against it."""
    return Path(anneal.__file__).resolve().parent.parent


def conf_dir() -> Path:
    """The Hydra config folder: the package `anneal.conf` (setup.py maps the top-level conf/ onto
    it; editable installs map it too), else conf/ of a source checkout."""
    try:
        spec = importlib.util.find_spec("anneal.conf")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent
    return package_root() / "conf"
