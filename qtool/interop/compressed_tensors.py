"""compressed-tensors `pack-quantized` (the layout vLLM and transformers read for W4A16/W8A16).

Per Linear `<m>` with W [N, K], b bits, G groups (compressed-tensors ≥ 0.18 layout):
  <m>.weight_packed      int32 [N, ceil(K·b/32)]   the codes as one dense little-endian bit
                                                   stream per row (code k at stream bits
                                                   [k·b, (k+1)·b)), NOT padded to 32 codes
  <m>.weight_scale       scale dtype [N, G]        G = 1 for strategy "channel"
  <m>.weight_zero_point  int32 [ceil(N·b/32), G]   only when symmetric is false: the zero-points,
                                                   packed the same way but along the OUTPUT dim
  <m>.weight_shape       int64 [2]                 (N, K)
compressed-tensors quantizes to signed q_s ∈ [−2^(b−1), 2^(b−1)) with a signed zero-point and
packs both offset by 2^(b−1); the stored values are therefore exactly qtool's unsigned codes and
zero-points, and Ŵ = s·(q − z) is the same affine map. A symmetric scheme has zero-point 0 signed,
i.e. 2^(b−1) unsigned: qtool's symmetric grids.

compressed-tensors refuses a group size that does not divide K, and (in this module) act-order
checkpoints: those go to --format gptq, whose g_idx holds both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qtool.errors import QtoolError
from qtool.nn.qlinear import QuantLinear
from qtool.quant.pack import pack, unpack

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
# The layout written: dense 3-bit streams (0.17.x left 2 unused bits per 3-bit word).
LAYOUT_VERSION = "0.18.0"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def pack_dense(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [R, C] -> int32 [R, ceil(C·b/32)]: qtool's stream, cut to the words the codes use."""
    words = math.ceil(codes.shape[1] * bits / 32)
    return pack(codes, bits)[:, :words].contiguous()


def unpack_dense(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 [R, ceil(C·b/32)] -> uint8 codes [R, C]."""
    if packed.dim() != 2 or packed.shape[1] != math.ceil(cols * bits / 32):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not hold {cols} {bits}-bit codes per row")
    full = (cols + 31) // 32 * bits
    padded = torch.nn.functional.pad(packed, (0, full - packed.shape[1]))
    return unpack(padded, bits, cols)


def is_symmetric(layer: QuantLinear) -> bool:
    return bool((layer.zeros == 1 << (layer.bits - 1)).all())


def check_layer(name: str, layer: QuantLinear, all_K: list[int]) -> None:
    """Refuse what the format cannot hold, naming the layer and what would work."""
    if layer.perm is not None:
        raise QtoolError(f"{name} uses act-order (a column permutation); compressed-tensors export does not "
                         "write it: use --format gptq, whose g_idx holds it")
    g = layer.group_size
    if g is not None and layer.in_features % g:
        fits = [c for c in (32, 64, 128) if all(k % c == 0 for k in all_K)]
        work = ", ".join([f"g{c}" for c in fits] + ["per-channel"])
        raise QtoolError(f"compressed-tensors cannot hold group size {g} for {name} (K = {layer.in_features} is "
                         f"not a multiple of {g}; the format has no short last group): quantize with {work}, "
                         "or export --format gptq")


def layer_tensors(layer: QuantLinear, symmetric: bool) -> dict[str, Tensor]:
    """The compressed-tensors tensors of one layer (suffix -> tensor)."""
    N, K = layer.out_features, layer.in_features
    if K % 32 == 0:  # qtool's rows are exactly the dense stream: no unpacking needed
        packed = layer.qweight.detach().cpu().contiguous()
    else:
        packed = pack_dense(layer.codes().cpu(), layer.bits)
    out = {"weight_packed": packed,
           "weight_scale": layer.effective_scales().detach().to("cpu", layer.scales.dtype).contiguous(),
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if not symmetric:
        out["weight_zero_point"] = pack_dense(layer.zeros.detach().cpu().t().contiguous(), layer.bits).t().contiguous()
    return out


def quantization_config(bits: int, group_size: int | None, symmetric: bool, ignore: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "group_size": group_size, "strategy": "channel" if group_size is None else "group",
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"version": LAYOUT_VERSION, "quant_method": QUANT_METHOD, "format": FORMAT,
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": FORMAT}},
            "ignore": sorted(ignore), "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
            "global_compression_ratio": None}


# ---------------------------------------------------------------- import


def scheme_of(qc: dict, where: str) -> dict:
    """The single int weight scheme of a pack-quantized config, checked; refuses the rest."""
    if qc.get("format") != FORMAT:
        raise QtoolError(f"{where}: compressed-tensors format {qc.get('format')!r} is not supported "
                         f"(qtool reads {FORMAT})")
    groups = qc.get("config_groups") or {}
    schemes = [g.get("weights") for g in groups.values() if isinstance(g, dict)]
    if len(schemes) != 1 or not isinstance(schemes[0], dict):
        raise QtoolError(f"{where}: {len(schemes)} compressed-tensors config groups; qtool reads one")
    w = schemes[0]
    acts = [g.get("input_activations") for g in groups.values()]
    if any(acts):
        raise QtoolError(f"{where}: quantized activations are not supported (weight-only schemes)")
    if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
        raise QtoolError(f"{where}: {w.get('type')} weights with strategy {w.get('strategy')!r} are not supported "
                         "(qtool reads int, group or channel)")
    version = str(qc.get("version") or "0")
    if w.get("num_bits") == 3 and _older(version, LAYOUT_VERSION):
        raise QtoolError(f"{where}: 3-bit weights written by compressed-tensors {version} use the pre-0.18 "
                         "layout, which qtool does not read")
    return w


def _older(version: str, than: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) if p.isdigit() else 0 for p in v.split(".")[:3])

    return key(version) < key(than)


def read_layer(name: str, t: dict[str, Tensor], w: dict) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(codes uint8 [N, K] in original column order, scales [N, G], zeros uint8 [N, G], g_idx or None)."""
    bits = int(w["num_bits"])
    try:
        N, K = (int(v) for v in t["weight_shape"].tolist())
        codes = unpack_dense(t["weight_packed"], bits, K)
        scales = t["weight_scale"]
        if scales.dim() != 2 or scales.shape[0] != N:
            raise ValueError(f"weight_scale has shape {tuple(scales.shape)}")
        G = scales.shape[1]
        if w.get("symmetric", True):
            zeros = torch.full((N, G), 1 << (bits - 1), dtype=torch.uint8)
        elif t["weight_zero_point"].dtype in (torch.int8, torch.int16) and t["weight_zero_point"].shape == (N, G):
            # unpacked signed zero-points, as the naive-quantized layout and older writers store them
            z = t["weight_zero_point"].to(torch.int16) + (1 << (bits - 1))
            if int(z.min()) < 0 or int(z.max()) >= 1 << bits:
                raise ValueError(f"zero-points outside the {bits}-bit grid")
            zeros = z.to(torch.uint8)
        else:
            zeros = unpack_dense(t["weight_zero_point"].t().contiguous(), bits, N).t().contiguous()
            if zeros.shape != (N, G):
                raise ValueError(f"weight_zero_point holds {tuple(zeros.shape)}, expected {(N, G)}")
    except KeyError as e:
        raise QtoolError(f"{name}: tensor {e.args[0]} is missing") from None
    except (ValueError, RuntimeError) as e:
        raise QtoolError(f"{name}: corrupted compressed-tensors layer ({e})") from None
    return codes, scales, zeros, t.get("weight_g_idx")


def runtimes(bits: int, symmetric: bool) -> list[str]:
    """Who loads what was written: tested here, or as documented by those projects."""
    out = ["transformers + compressed-tensors, CompressedTensorsConfig(dequantize=True) on CPU (tested by qtool)"]
    if bits in (4, 8):
        out.append("vLLM (documented: W4A16/W8A16 " + ("symmetric" if symmetric else "asymmetric, Marlin/Machete")
                   + ")")
    else:
        out.append(f"vLLM: {bits}-bit compressed-tensors serving is not in a vLLM release (documented only "
                   "for 4 and 8 bits)")
    return out
