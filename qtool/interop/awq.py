"""AWQ, GEMM layout (AutoAWQ `version: gemm`, what vLLM's AWQ path and transformers read). Import only.

Per Linear `<m>` with W [N, K], 4 bits, group size g, G = K / g:
  <m>.qweight  int32 [K, N/8]   8 codes per word packed along N, in AWQ's interleaved order: the
                                nibble at bits [4i, 4i+4) of word w holds output channel
                                8w + ORDER[i], ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  <m>.qzeros   int32 [G, N/8]   zero-points, packed the same way (stored as they are)
  <m>.scales   float16 [G, N]
Ŵ[n, k] = scales[k // g, n] · (q[k, n] − z[k // g, n]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.errors import QtoolError
from qtool.quant.pack import pack

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds channel ORDER[i] of its 8


def unpack_along_n(packed: Tensor) -> Tensor:
    """int32 [R, N/8] in AWQ order -> uint8 [R, N] in channel order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF  # [R, N/8, 8] by nibble
    out = torch.empty_like(nibbles)
    out[..., list(ORDER)] = nibbles  # nibble i -> channel ORDER[i]
    return out.reshape(packed.shape[0], -1).to(torch.uint8)


def read_config(qc: dict, where: str) -> int | None:
    """The group size (None per channel) of an AWQ quantization config; refuses what qtool cannot hold."""
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QtoolError(f"{where}: AWQ version {version!r} is not supported (qtool reads the GEMM layout)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise QtoolError(f"{where}: {bits}-bit AWQ is not supported (AWQ GEMM is 4-bit)")
    if qc.get("zero_point", True) is False:
        raise QtoolError(f"{where}: AWQ without zero-points is not supported")
    g = qc.get("group_size", qc.get("q_group_size", 128))
    if g not in (-1, 32, 64, 128):
        raise QtoolError(f"{where}: group size {g} is not one qtool runs (32, 64, 128, or −1 per channel)")
    return None if g == -1 else g


def read_layer(name: str, t: dict[str, Tensor], group_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(qtool qweight int32 [N, K/8], scales [N, G], zeros uint8 [N, G])."""
    try:
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2:
            raise ValueError("qweight and qzeros must be 2-D int32")
        K, N = qweight.shape[0], qweight.shape[1] * 8
        G = 1 if group_size is None else (K + group_size - 1) // group_size
        if K % 32 or tuple(scales.shape) != (G, N) or tuple(qzeros.shape) != (G, N // 8):
            raise ValueError(f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                             f"{tuple(scales.shape)} do not fit together")
    except KeyError as e:
        raise QtoolError(f"{name}: tensor {e.args[0]} is missing") from None
    except ValueError as e:
        raise QtoolError(f"{name}: corrupted AWQ layer ({e})") from None
    codes = unpack_along_n(qweight).t().contiguous()  # [N, K]
    zeros = unpack_along_n(qzeros).t().contiguous()
    return pack(codes, 4), scales.t().contiguous(), zeros
