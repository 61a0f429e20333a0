"""Distillation terms, one plug-in module each; importing this package registers them all
(in this order, which is the order of log columns and ``--help``).

See :mod:`kvkd.train.losses.base` for the interface. The loss functions stay importable from
here: ``from kvkd.train.losses import kv_loss, codi_loss, cka_loss, linear_cka``.
"""

from kvkd.train.losses import codi, kv, cka, simcot  # noqa: F401  (registration, in log order)
from kvkd.train.losses.base import (
    FUSIONS,
    LOSS_KINDS,
    LOSSES,
    AlignedTeacher,
    LossTerm,
    TermInputs,
    loss_option_fields,
    register_loss,
    terms,
)
from kvkd.train.losses.cka import cka_loss, linear_cka
from kvkd.train.losses.codi import codi_loss
from kvkd.train.losses.kv import KV_WEIGHTINGS, kv_loss
from kvkd.train.losses.simcot import simcot_loss

__all__ = [
    "FUSIONS", "KV_WEIGHTINGS", "LOSS_KINDS", "LOSSES", "AlignedTeacher", "LossTerm", "TermInputs", "cka_loss", "codi_loss",
    "kv_loss", "linear_cka", "loss_option_fields", "register_loss", "simcot_loss", "terms",
]
