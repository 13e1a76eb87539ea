"""Old import path, kept as an alias of ``nemokernels.speculative`` (README, "Where things moved")."""
import sys as _sys

from ..speculative import *  # noqa: F401,F403
from ..speculative import __all__, reference, verify  # noqa: F401

_sys.modules[f"{__name__}.reference"] = reference
