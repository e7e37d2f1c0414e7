"""bitsandbytes 4-bit NF4, as transformers saves a `load_in_4bit` model (and loads it back).

Per Linear `<m>` with W [N, K], n = N·K, B = ceil(n / blocksize) absmax blocks:
  <m>.weight                                  uint8 [ceil(n/2), 1]  two codes per byte, first
                                                                    element in the high nibble
  <m>.weight.absmax                           uint8 [B] with double quantization (8-bit codes of
                                                                    absmax − offset), else fp32 [B]
  <m>.weight.quant_map                        fp32 [16]   the NF4 levels
  <m>.weight.nested_absmax                    fp32 [ceil(B/256)]    double quantization only
  <m>.weight.nested_quant_map                 fp32 [256]  the signed dynamic 8-bit map (DQ only)
  <m>.weight.quant_state.bitsandbytes__nf4    uint8 [...] UTF-8 JSON: quant_type, blocksize, dtype,
                                              shape, and with DQ nested_blocksize, nested_dtype,
                                              nested_offset (the mean)
qtool's NF4 storage (docs/format.md §NF4) is this layout already: codes, absmax codes, the per-256
scale and the mean map one to one, and its tables are bitsandbytes' (checked at load).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from qtool.nn.nf4linear import NF4Linear
from qtool.quant import nf4

STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
RUNTIMES = ["transformers + bitsandbytes, load_in_4bit checkpoint (tested by qtool on CPU when bitsandbytes "
            "is installed)", "vLLM bitsandbytes path (documented, pre-quantized NF4 checkpoints)"]


def layer_tensors(layer: NF4Linear, compute_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    state: dict = {"quant_type": "nf4", "blocksize": layer.block_size,
                   "dtype": str(compute_dtype).removeprefix("torch."),
                   "shape": [layer.out_features, layer.in_features]}
    out = {"weight": layer.nf4_codes.detach().cpu().reshape(-1, 1).contiguous(),
           "weight.quant_map": nf4.nf4_levels()}
    if layer.double_quant:
        out["weight.absmax"] = layer.absmax_q.detach().cpu().contiguous()
        out["weight.nested_absmax"] = layer.absmax_scale.detach().cpu().float().contiguous()
        out["weight.nested_quant_map"] = nf4.dynamic_map()
        state.update({"nested_blocksize": nf4.DQ_BLOCK, "nested_dtype": "float32",
                      "nested_offset": float(layer.absmax_mean.detach().cpu().float().item())})
    else:
        out["weight.absmax"] = layer.absmax.detach().cpu().float().contiguous()
    out[STATE_KEY] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def quantization_config(layer: NF4Linear, dense: list[str], compute_dtype: torch.dtype = torch.float32) -> dict:
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": layer.double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": sorted(dense),
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}
