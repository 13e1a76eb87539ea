"""Scale-out on torch.distributed: expert parallelism for LatentMoE and FSDP2 for the model
package (docs/distributed.md)."""
import torch.distributed as _dist

# torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when first
# imported, and torch imports it lazily (with torch._dynamo, at the first functional collective
# or FSDP2 call). Imported after init_process_group, those defaults keep the world process group
# alive past destroy_process_group(): its gloo threads then run on into interpreter shutdown and
# now and then abort the process at exit. Imported here, before any process group exists, they
# bind None. (Import nemokernels.distributed before init_process_group.)
if _dist.is_available():
    import torch.distributed.nn  # noqa: F401

from .expert_parallel import ExpertParallelLatentMoE  # noqa: E402
from .parallel import full_state_dict, parallelize  # noqa: E402
from .shutdown import backend_threads, shutdown  # noqa: E402

__all__ = ["ExpertParallelLatentMoE", "backend_threads", "full_state_dict", "parallelize", "shutdown"]
