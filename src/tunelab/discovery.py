"""Finding extension modules (methods, tasks) by listing their package, so adding one edits no list."""
from __future__ import annotations

import importlib
import pkgutil


def import_all(package: str, paths, skip: tuple[str, ...] = ("base",)) -> None:
    for info in pkgutil.iter_modules(paths):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
