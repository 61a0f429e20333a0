"""Routers: per-sample teacher weights. Importing this package registers every router."""

from kvkd.train.routers import (  # noqa: F401  (registration)
    ae_kd,
    ca_mkd,
    difficulty,
    fixed,
    govern,
    grad_cosine,
    learnable,
    min_ce,
    mtkd_rl,
    oracle,
    persyn,
    rsr,
    similarity,
)
from kvkd.train.routers.base import ROUTERS, Router, RouterInputs, build_router

__all__ = ["ROUTERS", "Router", "RouterInputs", "build_router"]
