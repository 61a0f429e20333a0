"""Routers: per-sample teacher weights. Importing this package registers every router: each
module of this package (but ``base``) is imported, and registers itself with ``ROUTERS``, so
adding a router is adding one module."""

import importlib
import pkgutil

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs, build_router

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ROUTERS", "Router", "RouterInputs", "build_router"]
