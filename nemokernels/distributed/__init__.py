"""Scale-out on torch.distributed: expert parallelism for LatentMoE and FSDP2 for the model
package (docs/distributed.md)."""
from .expert_parallel import ExpertParallelLatentMoE
from .parallel import full_state_dict, parallelize

__all__ = ["ExpertParallelLatentMoE", "full_state_dict", "parallelize"]
