"""dynattack: adversarial attacks on dynamic (input-adaptive) neural networks."""
from .errors import DynattackError
from .gates import Gate, GateEvent, Trace, force_gates, gate_mode
from .models import create_model, list_models

__all__ = ["DynattackError", "Gate", "GateEvent", "Trace", "create_model", "force_gates", "gate_mode", "list_models"]
__version__ = "0.1.0"
