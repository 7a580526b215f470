"""Build files for the ktrdr-run runner images.

This package holds no code to import, only files: the runner ``Dockerfile`` and
``bootstrap-base.sh`` (an offline Debian base for hosts that cannot reach a registry).
It is a package so that those files ship with the installed project;
``dispatcher.images`` finds them through :data:`IMAGES_DIR`.
"""

from __future__ import annotations

from pathlib import Path

IMAGES_DIR = Path(__file__).parent
"""The folder that holds the Dockerfiles and image scripts."""

__all__ = ["IMAGES_DIR"]
