"""Build step that puts the default model, the model registry and the caption page into the package.

Everything else is in pyproject.toml. The repository keeps these files at the top level (``models/``,
``clients/web/``) where people and the docs look for them; a wheel carries copies under
``streamer/bundled/`` with the same relative layout, which ``streamer/resources.py`` prefers when present.

Why a build_py step and not the declarative options: ``[tool.setuptools.data-files]`` installs outside the
package (into ``<prefix>/...``, where the code cannot find it reliably), and mapping ``models/`` in as a
package with ``package-dir`` would need an explicit list of every package (it cannot be mixed with
``packages.find``) and makes ``models/streamer-tdt-small`` a package name with a hyphen. Copying at build
time needs neither, leaves the 34 MB model once in git, and is skipped by editable installs
(``pip install -e``, which setup.sh uses): those import ``streamer`` from the checkout, where
``streamer/resources.py`` finds the repository's own ``models/`` and ``clients/``. MANIFEST.in puts the same
files into the sdist, so a wheel built from the sdist has them too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLE_DIR = "streamer/bundled"  # streamer/resources.py looks here (its BUNDLE_DIR)
# Files copied into the package, as globs relative to the repository root; each must match something.
BUNDLED = (
    "models/registry.toml",
    "models/streamer-tdt-small/*",
    "clients/web/**/*",
)


def bundled_files() -> list[Path]:
    """Every file to bundle, relative to the repository root; stops the build when one is missing."""
    found: list[Path] = []
    for pattern in BUNDLED:
        matches = sorted(p.relative_to(ROOT) for p in ROOT.glob(pattern) if p.is_file())
        if not matches:
            raise SystemExit(
                f"cannot build streamer: nothing matches {pattern} in {ROOT}; build from a full checkout "
                "(or an sdist made from one), which has models/ and clients/web/"
            )
        found += matches
    return found


class BuildPyWithBundle(build_py):
    """``build_py`` that also copies :data:`BUNDLED` into ``streamer/bundled/`` of the build directory."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        # A build/ left by an earlier `pip install .` would otherwise keep files since removed from the repository.
        shutil.rmtree(Path(self.build_lib) / BUNDLE_DIR, ignore_errors=True)
        for source, target in self._bundle_mapping().items():
            self.mkpath(str(Path(target).parent))
            self.copy_file(source, target, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, *self._bundle_mapping().values()]

    def _bundle_mapping(self) -> dict[str, str]:
        """Source file -> its path in the build directory."""
        target = Path(self.build_lib) / BUNDLE_DIR
        return {str(ROOT / rel): str(target / rel) for rel in bundled_files()}


setup(cmdclass={"build_py": BuildPyWithBundle})
