"""Attacks on gated victims. Each reads only the trace and the logits (no model family imports).

Energy: :class:`ILFO`, :class:`GradAuto`. Accuracy (on :class:`AccuracyAttack`, gradient mode
fgm / lgm / lgm_st): :class:`FGSM`, :class:`IFGSM`, :class:`PGD`, :class:`MIFGSM`; on point clouds
:class:`PointIFGSM` and the baseline :class:`PointRandom`, and the energy attacks over voxel
occupancy :class:`PointGradAuto` and :class:`PointILFO`.
``ATTACKS`` maps the command-line names to the classes.
"""
from .base import AccuracyAttack, Attack, AttackResult, EnergyAttack, Evaluation, Forward, GateUnits
from .fgsm import FGSM
from .gradauto import GradAuto
from .ifgsm import IFGSM
from .ilfo import ILFO
from .mifgsm import MIFGSM
from .pc_gradauto import PointGradAuto
from .pc_ifgsm import PointIFGSM
from .pc_ilfo import PointILFO
from .pc_random import PointRandom
from .pgd import PGD

ATTACKS: dict[str, type[Attack]] = {"ilfo": ILFO, "gradauto": GradAuto,
                                    "fgsm": FGSM, "ifgsm": IFGSM, "pgd": PGD, "mifgsm": MIFGSM,
                                    "pc-ifgsm": PointIFGSM, "pc-random": PointRandom,
                                    "pc-gradauto": PointGradAuto, "pc-ilfo": PointILFO}

__all__ = ["ATTACKS", "AccuracyAttack", "Attack", "AttackResult", "EnergyAttack", "Evaluation", "FGSM", "Forward",
           "GateUnits", "GradAuto", "IFGSM", "ILFO", "MIFGSM", "PGD", "PointGradAuto", "PointIFGSM", "PointILFO", "PointRandom"]
