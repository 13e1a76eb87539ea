"""Orderly end of a torch.distributed run (docs/distributed.md, "Shutting down").

Details: docs/distributed.md, section `nemokernels/distributed/shutdown.py`."""
import gc
import glob
import importlib
import sys
import warnings

import torch.distributed as dist

# Thread names (/proc/<pid>/task/*/comm, 15 characters at most) of the c10d backends' threads:
# gloo's work loop and TCP event loop, NCCL's watchdog and heartbeat monitor.
_BACKEND_THREADS = ("pt_gloo", "gloo_", "pt_nccl")


def backend_threads() -> list:
    """Sorted names of this process's live c10d backend threads (Linux; [] where /proc is absent)."""
    names = []
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_BACKEND_THREADS):
            names.append(name)
    return sorted(names)


def _clear_dtensor_caches() -> None:
    """DTensor (FSDP2's parameters) caches redistribution plans, transform steps, sharding
    decisions and mesh topologies for the life of the process, each holding a DeviceMesh, which
    holds its process groups: cleared here so that destroy_process_group() can release them.
    (Private torch functions, looked up defensively: one that moved is skipped, and shutdown()
    then reports the threads left.)"""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor used: nothing cached
        return

    def attr(module, *names):
        try:
            obj = importlib.import_module(module)
        except ImportError:
            return None
        for name in names:
            obj = getattr(obj, name, None)
        return obj

    for clear in (attr("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
                  attr("torch.distributed.tensor._redistribute", "_gen_transform_infos", "cache_clear"),
                  attr("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
                  attr("torch.distributed.tensor._collective_utils", "MeshTopoInfo", "build_from_mesh", "cache_clear")):
        if clear is not None:
            clear()


def shutdown(barrier: bool = True) -> list:
    """Destroy every process group and check that their backends are gone; returns the backend
    threads still alive ([] on a complete shutdown; a warning says what to look for otherwise).

    Call it on every rank once the run's collectives are done, after dropping your references to
    what holds the process group (parallelized models, optimizers over their parameters, outputs
    whose autograd graph is alive): return from the function that trained, then call this.
    barrier=True first waits for every rank, so none closes its connections while another still
    sends to it; pass False on an error path, where a peer may never reach the barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return backend_threads()
    if barrier:
        dist.barrier()
    _clear_dtensor_caches()
    gc.collect()  # modules and optimizers in reference cycles still hold the group
    dist.destroy_process_group()
    gc.collect()
    left = backend_threads()
    if left:
        warnings.warn(
            f"nemokernels.distributed.shutdown: {len(left)} process-group backend threads ({', '.join(left)}) are "
            "still running after destroy_process_group(): something still references a process group (a model, "
            "an optimizer, a live autograd graph, or torch.distributed.nn imported after init_process_group), so "
            "its backend lives on into interpreter shutdown, where it can abort the process",
            RuntimeWarning, stacklevel=2)
    return left
