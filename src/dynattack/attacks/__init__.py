"""Attacks on gated victims. Each reads only the trace and the logits (no model family imports).

Energy: :class:`ILFO`, :class:`GradAuto`. Accuracy attacks build on :class:`AccuracyAttack`.
``ATTACKS`` maps the command-line names to the classes.
"""
from .base import AccuracyAttack, Attack, AttackResult, EnergyAttack, Evaluation, Forward, GateUnits
from .gradauto import GradAuto
from .ilfo import ILFO

ATTACKS: dict[str, type[Attack]] = {"ilfo": ILFO, "gradauto": GradAuto}

__all__ = ["ATTACKS", "AccuracyAttack", "Attack", "AttackResult", "EnergyAttack", "Evaluation", "Forward",
           "GateUnits", "GradAuto", "ILFO"]
