"""torchrun setup, rank helpers, and the one place a model is wrapped for training: activation
checkpointing, torch.compile, DDP or FSDP (:func:`parallelize`). Models stay plain single-device
modules."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformerBlock
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from openmae.models.convmae import ConvBlock
from openmae.models.vit import Block


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available; use --train.device cpu")
    return device


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_over_ranks(t: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """A copy of the CPU tensor ``t`` summed over all ranks, back on the CPU; ``t`` itself without a
    process group. It travels through ``device`` (this rank's GPU under NCCL, which reduces only GPU
    tensors), so a call is a host sync: keep such counts small and their calls few."""
    if not info.enabled:
        return t
    t = t.to(device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# -- wrapping a plain model for training: activation checkpointing, compile, DDP or FSDP -----------

STRATEGIES = ("ddp", "fsdp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (ViT / ConvMAE blocks, timm's Swin blocks), in module order: the
    units that activation checkpointing recomputes and FSDP gathers one at a time. A block inside a
    block is not listed again."""
    kinds = (Block, ConvBlock, SwinTransformerBlock)
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, kinds):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (in place).

    Only the block's input is kept; its forward runs again, under the RNG state it first ran with
    (drop path draws the same), when its gradient is needed: about one more forward of the blocks
    for the activation memory of all but one. The block's ``forward`` is replaced on the instance,
    so parameter names, and with them state dicts and checkpoints, do not change.
    """
    for block in transformer_blocks(model):
        block.forward = _recomputed(block.forward)


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model``'s structure with every parameter on the meta device (no memory); buffers are copied.
    Non-persistent buffers (Swin's position indices), absent from state dicts, come with it."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


class Parallel:
    """A plain model set up for training by :func:`parallelize`.

    ``module`` is what the training forward goes through: the plain model itself on one process, a
    DDP wrapper around it (or around its compiled form), or, under FSDP, the model itself, sharded
    in place (its parameters are now DTensors holding this rank's slice). Everything else, the
    checkpoints, hooks and the exported model, sees the plain model through :meth:`full_model` and
    :meth:`state_dicts`, which under FSDP gather it and so must be called on every rank.
    """

    def __init__(self, plain: nn.Module, module: nn.Module, strategy: str, skeleton: nn.Module | None = None) -> None:
        self.plain, self.module, self.strategy = plain, module, strategy
        self._skeleton = skeleton  # FSDP: the plain model's structure, parameters on the meta device

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def full_model(self) -> nn.Module:
        """The plain model with all its weights on this rank's device. Under FSDP a new module
        (a full copy of the weights on every rank, freed when dropped), gathered from all ranks."""
        if not self.sharded:
            return self.plain
        options = StateDictOptions(full_state_dict=True)  # every rank gets every tensor, on its device
        state = get_model_state_dict(self.module, options=options)
        model = copy.deepcopy(self._skeleton)
        model.load_state_dict(state, assign=True)
        return model.train(self.module.training)

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimizer's state dicts as one process would have them (the optimizer's
        state keyed by parameter position). Under FSDP they are gathered to rank 0's CPU; the other
        ranks get empty dicts."""
        if not self.sharded:
            return self.plain.state_dict(), optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.module, options=options)
        optim_state = get_optimizer_state_dict(self.module, optimizer, options=options)
        if not model_state:
            return {}, {}
        # DCP keys the optimizer's state by parameter name; a plain optimizer by position in its groups
        position = {name: i for i, name in enumerate(n for g in optim_state["param_groups"] for n in g["params"])}
        return model_state, {
            "state": {position[name]: slots for name, slots in optim_state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in optim_state["param_groups"]],
        }

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a state dict that :meth:`state_dicts` made (on any number of processes, any strategy);
        under FSDP every rank passes the whole of it and keeps its own slice."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        name_of = {p: n for n, p in self.module.named_parameters()}
        names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
        by_name = {
            "state": {names[int(i)]: slots for i, slots in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(self.module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def no_sync(self, defer: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward when gradient accumulation goes on (``defer``).

        DDP skips its all-reduce until the step's last micro-batch. FSDP reduce-scatters every
        micro-batch instead: deferring would keep every parameter's full gradient on each rank,
        giving back the memory FSDP exists to save, for less communication.
        """
        if defer and self.strategy == "ddp":
            return self.module.no_sync()
        return contextlib.nullcontext()


def parallelize(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    *,
    strategy: str = "ddp",
    compile: bool = False,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
) -> Parallel:
    """Set up the plain ``model`` (already on ``device``) for training; the one place that wraps it.

    Args:
        strategy: ``ddp`` (every rank holds the whole model; gradients all-reduced) or ``fsdp``
            (FSDP2: parameters, gradients and optimizer state sharded over the ranks; each block's
            parameters all-gathered just before it runs and freed after). One process ignores it.
        compile: ``torch.compile``: the whole model under one process and DDP, each block under FSDP.
        activation_checkpointing: recompute block activations in the backward pass.
        param_dtype: FSDP's mixed precision: the dtype weights are gathered in (the run's autocast
            dtype, None for fp32), for a forward under that autocast; gradients are reduced in fp32
            and the sharded weights stay fp32.

    The order, and why:

    1. Activation checkpointing first, on the blocks' own ``forward``: compile then sees the
       recompute region and keeps it, and FSDP's hooks stay outside it, so a recomputed block
       finds its parameters gathered again by FSDP's pre-backward hook.
    2. ``torch.compile`` before any wrapper, so the compiled graphs hold the model's maths and no
       collectives, the same graphs on one process or many. Under DDP the whole model is compiled
       and DDP wraps it (DDP outermost gives ``no_sync``; the cost: the all-reduce waits for the
       whole compiled backward instead of overlapping it bucket by bucket). Under FSDP each block's
       ``forward`` is compiled on its own: FSDP's all-gather and reduce-scatter run in hooks around
       the block's call, outside the graph, which tracing them would break up or need compiled
       autograd for; the rest (embedding, masking, decoder head, loss) runs eagerly.
    3. ``fully_shard`` on every block, then on the root. Each call makes one communication group:
       blocks first, so a block's parameters are gathered right before it runs and freed after it
       (peak memory: the sharded model plus about one block in full); the root last, taking what no
       block took (patch embedding, tokens, norms, heads) into one more group.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    plain = model
    if not info.enabled:
        strategy = "single"
    skeleton = _meta_copy(model) if strategy == "fsdp" else None  # before anything below changes the model
    if activation_checkpointing:
        checkpoint_activations(model)
    if strategy != "fsdp":
        if compile:
            model = torch.compile(model)
        if strategy == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return Parallel(plain, model, strategy)
    blocks = transformer_blocks(model)
    if compile:
        # blocks of one shape share a graph; a block of another shape (the decoder's, a later stage's)
        # gets its own static one rather than turning the first into a dynamic-shape graph
        for block in blocks:
            block.forward = torch.compile(block.forward, dynamic=False)
    # Inputs are left as they come: the run's autocast casts what each op needs, as without FSDP,
    # where casting them would round MAE's masking noise to bf16 (other masks) and the residual stream.
    reduce_dtype = torch.float32 if param_dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # FSDP warns when a forward returns a view (MAE's pred is a slice): an in-place change to it would
    # skip the pre-backward gather. Tasks only read a model's outputs and differentiate the loss.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return Parallel(plain, model, strategy, skeleton)
