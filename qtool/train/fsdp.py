"""`finetune --fsdp`: the training loop's model sharded over the processes with FSDP2.

Each decoder block becomes an FSDP unit; the packed weights first move into float
storage that FSDP can shard (qtool.nn.fsdp_storage). Every process then holds 1/N of the packed
blocks, of the trainable values and of their optimizer moments, and FSDP gathers a block's weights
for its forward and backward. docs/distributed.md describes the approach and its limits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtool import dist
from qtool.errors import QtoolError


def shard(model: nn.Module, params: dict[str, nn.Parameter], device: torch.device) -> dict[str, nn.Parameter]:
    """Shard `model` in place; returns the trainable set as the sharded Parameters (FSDP replaces
    the Parameter objects, so the set is looked up again by each parameter's module path)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qtool.models.load import decoder_layers
    from qtool.nn.fsdp_storage import to_float_storage

    if dist.world_size() < 2:
        raise QtoolError("--fsdp shards the model over several processes: add --num-processes N (N ≥ 2)")
    path = {id(p): n for n, p in model.named_parameters()}
    where = {name: path[id(p)] for name, p in params.items()}
    to_float_storage(model)
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    # The blocks only: the loss runs the decoder and the output head separately (chunked), so
    # a root unit's hooks would not gather the embedding and head; they stay whole on every
    # process (for an 8B model, 2 × 1 GB of bf16 next to 4 GB of W4 blocks).
    units = list(decoder_layers(model))
    for unit in units:
        # FSDP's reduce-scatter averages over the processes; the loop scales each process's
        # loss by N so that the mean is the step's summed gradient (a divide factor of 1 would
        # need PREMUL_SUM, which gloo lacks).
        fully_shard(unit, mesh=mesh)
    now = dict(model.named_parameters())
    return {name: now[where[name]] for name in params}


def whole(t: Tensor) -> Tensor:
    """The full value of a (possibly sharded) tensor; a collective when sharded: every process calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def place(full: Tensor, like: Tensor) -> Tensor:
    """`full` laid out as `like` (sharded the same way when `like` is a DTensor)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device_mesh.device_type).to(like.dtype), like.device_mesh, like.placements)
