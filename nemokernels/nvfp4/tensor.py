"""NVFP4Tensor: the packed format of docs/design.md section 4.3.

- data: uint8 (..., K/2), two E2M1 codes per byte, element 2i in the low nibble.
- scales: float8_e4m3fn (..., K/16), one decode scale per 16 consecutive elements of the last
  dim, plain row-major. For 16x16 (block_2d) quantization every row of a 16x16 tile carries the
  tile's scale, so consumers never need to know which variant produced it.
- global_scale: float32 scalar tensor (0-dim) = 1 / s_enc; x_hat = e2m1(code) * s_b * global_scale.
"""
from dataclasses import dataclass

import torch


@dataclass
class NVFP4Tensor:
    data: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.data.device
