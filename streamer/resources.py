"""Where the files that ship beside the code live: the model registry, the bundled default model, the caption page.

The repository keeps them at the top level (``models/registry.toml``, ``models/streamer-tdt-small/``,
``clients/web/``). A wheel or ``pip install .`` carries copies inside the package, under
``streamer/bundled/`` with the same layout (``setup.py`` puts them there at build time), so the registry's
relative paths mean the same thing in both. The installed package's copy wins; a checkout, and the
editable install ``setup.sh`` makes, has no ``streamer/bundled/`` and uses the repository's own folders.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUNDLE_DIR = "bundled"  # the folder inside the package; setup.py writes the same name


def data_root() -> Path:
    """The folder holding ``models/`` and ``clients/``: the installed package's copy, else the checkout."""
    # A package imported from files (every wheel install, the checkout) is a real directory; the model is
    # loaded and the page read by path, so a zipped package could not use its copy anyway.
    package_dir = Path(str(files("streamer")))
    bundled = package_dir / BUNDLE_DIR
    if (bundled / "models" / "registry.toml").is_file():
        return bundled
    return package_dir.parent


def default_registry() -> Path:
    """The model registry that ``--model NAME`` reads: ``models/registry.toml``."""
    return data_root() / "models" / "registry.toml"


def web_root() -> Path:
    """The caption page's folder (``clients/web``), served at ``/`` unless ``server.web_root`` says otherwise."""
    return data_root() / "clients" / "web"
