"""Distillation terms, one plug-in module each. Importing this package registers them all: each
module of this package (but ``base``) is imported and registers its term with ``LOSSES``, so
adding a loss is adding one module. See :mod:`kvkd.train.losses.base` for the interface.

The loss functions stay importable from here: ``from kvkd.train.losses import kv_loss,
codi_loss, cka_loss, linear_cka``.
"""

import importlib
import pkgutil

from kvkd.train.losses.base import (
    FUSIONS,
    LOSS_KINDS,
    LOSSES,
    AlignedTeacher,
    LossTerm,
    TermInputs,
    loss_option_fields,
    register_loss,
    teacher_extras,
    terms,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from kvkd.train.losses.cka import cka_loss, linear_cka  # noqa: E402
from kvkd.train.losses.codi import codi_loss  # noqa: E402
from kvkd.train.losses.kv import KV_WEIGHTINGS, kv_loss  # noqa: E402
from kvkd.train.losses.simcot import simcot_loss  # noqa: E402

__all__ = [
    "FUSIONS", "KV_WEIGHTINGS", "LOSS_KINDS", "LOSSES", "AlignedTeacher", "LossTerm", "TermInputs", "cka_loss", "codi_loss",
    "kv_loss", "linear_cka", "loss_option_fields", "register_loss", "simcot_loss", "teacher_extras", "terms",
]
