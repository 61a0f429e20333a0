"""Routers: per-sample teacher weights. Importing this package registers every router."""

from kvkd.train.routers import fixed, learnable, similarity  # noqa: F401  (registration)
from kvkd.train.routers.base import ROUTERS, Router, RouterInputs, build_router

__all__ = ["ROUTERS", "Router", "RouterInputs", "build_router"]
