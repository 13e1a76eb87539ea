"""Peer implementations for the baselines, imported when present: mamba_ssm's Triton kernels,
either installed or from a source checkout named by NK_MAMBA_SSM_SRC (the repository root; its
Triton path needs no build, only triton and einops), loaded without mamba_ssm/__init__.py
(which would import the compiled selective-scan extension)."""
import importlib
import os
import sys
import types


def src_dir():
    return os.environ.get("NK_MAMBA_SSM_SRC")


def mamba_ssm_triton(module: str, attr: str):
    """(mamba_ssm.ops.triton.<module>.<attr>, where it came from), or (None, why not)."""
    try:
        fn = getattr(importlib.import_module(f"mamba_ssm.ops.triton.{module}"), attr)
        # mamba_ssm already in sys.modules may be the source checkout loaded below.
        return fn, "installed" if getattr(sys.modules["mamba_ssm"], "__file__", None) else f"source {src_dir()}"
    except Exception as e:  # noqa: BLE001
        installed_error = f"{type(e).__name__}: {e}"
    src = src_dir()
    if not src:
        return None, f"not importable ({installed_error}); set NK_MAMBA_SSM_SRC to a source checkout"
    try:
        for name, sub in [("mamba_ssm", "mamba_ssm"), ("mamba_ssm.ops", "mamba_ssm/ops"),
                          ("mamba_ssm.ops.triton", "mamba_ssm/ops/triton")]:
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                pkg = types.ModuleType(name)
                pkg.__path__ = [os.path.join(src, sub)]  # namespace-like: skips the package __init__
                sys.modules[name] = pkg
        return getattr(importlib.import_module(f"mamba_ssm.ops.triton.{module}"), attr), f"source {src}"
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def mamba_ssm_peer(module: str, attr: str):
    """mamba_ssm.ops.triton.<module>.<attr> for a baseline, or None after printing why not."""
    fn, note = mamba_ssm_triton(module, attr)
    if fn is None:
        print(f"mamba_ssm Triton {attr} baseline skipped: {note}")
    return fn
