"""GPTQ (GPTQModel / AutoGPTQ / vLLM's GPTQ path), `checkpoint_format` gptq_v2 or gptq (v1).

Per Linear `<m>` with W [N, K], b bits, G groups:
  <m>.qweight  int32 [K·b/32, N]   codes packed along K, column n = output channel n: each
                                   run of 32 codes of a column fills b words as one little-endian
                                   bit stream (b = 2/4/8: 32/b codes per word, lowest code in the
                                   lowest bits; b = 3: GPTQModel's "10 | 1 | 10 | 1 | 10" words, which
                                   is the same dense stream). This is qtool's qweight transposed.
  <m>.qzeros   int32 [G, N·b/32]   zero-points packed the same way along N: gptq_v2 stores z,
                                   v1 stores z − 1 (which cannot hold z = 0)
  <m>.scales   float16 [G, N]
  <m>.g_idx    int32 [K]           the group of each input feature (act-order: any permutation
                                   of the sequential groups; codes stay in feature order)
  <m>.bias     [N]                 when the Linear has one
Ŵ[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n]). Per-channel is group_size −1, G = 1.
GPTQ packs along K and N in whole 32-code runs, so K and N must be multiples of 32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool import __version__
from qtool.errors import QtoolError
from qtool.interop.hf_dir import exact_cast
from qtool.nn.qlinear import QuantLinear
from qtool.quant.pack import pack, unpack

V2, V1 = "gptq_v2", "gptq"
SUPPORTED_BITS = (2, 3, 4, 8)


def _group_ids(K: int, group_size: int | None) -> Tensor:
    return torch.zeros(K, dtype=torch.int32) if group_size is None else torch.arange(K, dtype=torch.int32) // group_size


def check_layer(name: str, layer: QuantLinear, v1: bool) -> None:
    N, K = layer.out_features, layer.in_features
    if K % 32 or N % 32:
        raise QtoolError(f"GPTQ cannot hold {name}: it packs whole runs of 32 codes along both dimensions, and "
                         f"this layer is {N}×{K}; use --format compressed-tensors")
    if v1 and int(layer.zeros.min()) == 0:
        raise QtoolError(f"{name} has zero-point 0, which GPTQ v1 stores as z − 1 = −1 and reads back as "
                         f"{1 << layer.bits} (overflow): export gptq_v2 (drop --gptq-v1)")
    if exact_cast(layer.effective_scales().detach().cpu(), torch.float16) is None:
        raise QtoolError(f"{name}: its {layer.scales.dtype} scales are not exactly representable in float16, "
                         "which GPTQ stores; use --format compressed-tensors")


def layer_tensors(layer: QuantLinear, v1: bool = False) -> dict[str, Tensor]:
    K, b = layer.in_features, layer.bits
    g_idx = _group_ids(K, layer.group_size)
    if layer.perm is None:
        qweight = layer.qweight.detach().cpu().t().contiguous()
    else:  # GPTQ keeps codes in feature order; g_idx says which group each feature took
        inv = torch.argsort(layer.perm.cpu())
        qweight = pack(layer.codes().cpu()[:, inv], b).t().contiguous()
        g_idx = g_idx[inv].contiguous()
    zeros = layer.zeros.detach().cpu().to(torch.int64)
    if v1:
        zeros = zeros - 1
    qzeros = pack(zeros.t().contiguous(), b)
    scales = exact_cast(layer.effective_scales().detach().cpu(), torch.float16)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous(), "g_idx": g_idx}


def quantization_config(bits: int, group_size: int | None, symmetric: bool, act_order: bool, v1: bool,
                        dense: list[str]) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": -1 if group_size is None else group_size,
            "desc_act": act_order, "sym": symmetric, "lm_head": "lm_head" not in dense,
            "checkpoint_format": V1 if v1 else V2, "pack_dtype": "int32",
            "meta": {"quantizer": [f"qtool:{__version__}"]}}


def runtimes(bits: int, symmetric: bool) -> list[str]:
    return ["an independent unpacker written from this layout (tested by qtool)",
            f"vLLM GPTQ path (documented: bits 2/3/4/8{'' if symmetric else ', asymmetric via gptq_v2'})",
            "GPTQModel / transformers' GPTQ loader (documented)"]


# ---------------------------------------------------------------- import


def read_config(qc: dict, where: str) -> tuple[int, int | None, bool]:
    """(bits, group_size or None, v1) of a GPTQ quantization config; refuses what qtool cannot hold."""
    fmt = qc.get("checkpoint_format", qc.get("format", V1)) or V1
    if fmt not in (V1, V2):
        raise QtoolError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (qtool reads {V1}, {V2})")
    bits, g = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise QtoolError(f"{where}: {bits}-bit GPTQ is not supported (qtool holds {SUPPORTED_BITS})")
    if g not in (-1, 32, 64, 128):
        raise QtoolError(f"{where}: group size {g} is not one qtool runs (32, 64, 128, or −1 per channel)")
    return bits, None if g == -1 else g, fmt == V1


def perm_from_g_idx(g_idx: Tensor, group_size: int | None, K: int, name: str) -> Tensor | None:
    """None for sequential groups; else qtool's act-order perm (stored column j holds feature
    perm[j]), refusing a g_idx whose groups are not the sequential group sizes in some order."""
    seq = _group_ids(K, group_size).to(torch.int64)
    g_idx = g_idx.to(torch.int64)
    if g_idx.shape != (K,):
        raise QtoolError(f"{name}: g_idx has shape {tuple(g_idx.shape)}, expected ({K},)")
    if torch.equal(g_idx, seq):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], seq):
        raise QtoolError(f"{name}: g_idx does not assign each group {group_size} features; not a GPTQ "
                         "act-order layout qtool can hold")
    return perm


def read_layer(name: str, t: dict[str, Tensor], bits: int, group_size: int | None, v1: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(qtool qweight int32 [N, K·b/32], scales [N, G], zeros uint8 [N, G], perm or None)."""
    try:
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2:
            raise ValueError("qweight and qzeros must be 2-D int32")
        N = scales.shape[1]
        K = qweight.shape[0] * 32 // bits
        if qweight.shape[0] * 32 % bits or K % 32 or qweight.shape[1] != N:
            raise ValueError(f"qweight {tuple(qweight.shape)} does not match scales {tuple(scales.shape)}")
        G = 1 if group_size is None else (K + group_size - 1) // group_size
        if scales.shape[0] != G:
            raise ValueError(f"scales have {scales.shape[0]} groups, expected {G}")
        z = unpack(qzeros, bits, N).t().to(torch.int16)
        if z.shape != (N, G):
            raise ValueError(f"qzeros hold {tuple(z.shape)}, expected {(N, G)}")
    except KeyError as e:
        raise QtoolError(f"{name}: tensor {e.args[0]} is missing") from None
    except (ValueError, RuntimeError) as e:
        raise QtoolError(f"{name}: corrupted GPTQ layer ({e})") from None
    if v1:
        z = z + 1
        if int(z.max()) >= 1 << bits:
            raise QtoolError(f"{name}: a v1 zero-point of {(1 << bits) - 1} means z = {1 << bits}, outside the "
                             f"{bits}-bit grid qtool stores")
    g_idx = t.get("g_idx")
    perm = None if g_idx is None else perm_from_g_idx(g_idx, group_size, K, name)
    qw = qweight.t().contiguous()
    if perm is not None:
        qw = pack(unpack(qw, bits, K)[:, perm], bits)
    return qw, scales.t().contiguous(), z.to(torch.uint8), perm
