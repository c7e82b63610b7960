"""Attacks on gated victims. Each reads only the trace and the logits (no model family imports).

Energy: :class:`ILFO`, :class:`GradAuto` (minimum-norm, no budget) and the budgeted
:class:`EnergyPGD` (Linf ball ``eps``), and :class:`UniversalEnergy`, one perturbation for every
input fitted on training images. Accuracy (on :class:`AccuracyAttack`, gradient mode
fgm / lgm / lgm_st): :class:`FGSM`, :class:`IFGSM`, :class:`PGD`, :class:`MIFGSM`; on point clouds
:class:`PointIFGSM` and the baseline :class:`PointRandom`, and the energy attacks over voxel
occupancy :class:`PointGradAuto` (budgeted: coordinates within ``eps`` metres, the point-cloud
energy PGD counterpart) and :class:`PointILFO`. ``dynattack sweep`` runs any attack with an
``eps`` over a list of budgets.
``ATTACKS`` maps the command-line names to the classes.
"""
from .base import AccuracyAttack, Attack, AttackResult, EnergyAttack, Evaluation, Forward, GateUnits
from .energy_pgd import EnergyPGD
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
from .universal_energy import UniversalEnergy

ATTACKS: dict[str, type[Attack]] = {"ilfo": ILFO, "gradauto": GradAuto, "energy-pgd": EnergyPGD,
                                    "universal-energy": UniversalEnergy,
                                    "fgsm": FGSM, "ifgsm": IFGSM, "pgd": PGD, "mifgsm": MIFGSM,
                                    "pc-ifgsm": PointIFGSM, "pc-random": PointRandom,
                                    "pc-gradauto": PointGradAuto, "pc-ilfo": PointILFO}

__all__ = ["ATTACKS", "AccuracyAttack", "Attack", "AttackResult", "EnergyAttack", "EnergyPGD", "Evaluation", "FGSM", "Forward",
           "GateUnits", "GradAuto", "IFGSM", "ILFO", "MIFGSM", "PGD", "PointGradAuto", "PointIFGSM", "PointILFO", "PointRandom",
           "UniversalEnergy"]
