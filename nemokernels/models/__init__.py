"""NemotronH (hybrid Mamba-2 / attention / LatentMoE, with MTP) on the nemokernels ops
(docs/design.md section 5): config, layers, model, Hugging Face checkpoints, speculative generate."""
from .config import NemotronHConfig
from .model import CausalLMOutput, CheckpointError, NemotronHForCausalLM, NemotronHModel
from .serving import decode_greedy, decode_tree_greedy, prefill_packed

__all__ = ["NemotronHConfig", "NemotronHForCausalLM", "NemotronHModel", "CausalLMOutput", "CheckpointError",
           "prefill_packed", "decode_greedy", "decode_tree_greedy"]
