"""Plug-in discovery shared by ``sources/`` and ``filters/``: every module of the package is imported
and its concrete subclasses of the base class are registered under their ``name``, so a new source
or stage is one new file and nothing else."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Iterable, TypeVar

T = TypeVar("T")


def discover(package: str, path: Iterable[str], base: type[T], skip: Iterable[str] = ("base",)) -> dict[str, type[T]]:
    found: dict[str, type[T]] = {}
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in skip:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, base) and cls.__module__ == module.__name__ and not inspect.isabstract(cls):
                name = getattr(cls, "name", None)
                if not name:
                    continue
                if name in found and found[name] is not cls:
                    raise RuntimeError(f"two {base.__name__} classes named {name!r}: {found[name]} and {cls}")
                found[name] = cls
    return found
