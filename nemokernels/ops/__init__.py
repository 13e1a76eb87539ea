"""Old import path, kept as an alias: the SSD family moved to ``nemokernels.ssd`` and the
verification fakes to ``nemokernels.speculative.verify`` (README, "Where things moved")."""
import importlib as _importlib
import sys as _sys

_MOVED = {"causal_conv1d": "nemokernels.ssd.causal_conv1d", "ssd_chunk_scan": "nemokernels.ssd.ssd_chunk_scan",
          "state_update": "nemokernels.ssd.state_update", "rmsnorm_gated": "nemokernels.ssd.rmsnorm_gated",
          "reference": "nemokernels.ssd.reference", "spec_verify": "nemokernels.speculative.verify"}
for _old, _new in _MOVED.items():
    _sys.modules[f"{__name__}.{_old}"] = globals()[_old] = _importlib.import_module(_new)
