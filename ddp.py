"""
DistributedDataParallel plumbing for train.py (used only when it runs under torchrun).

    torchrun --nproc_per_node=2 train.py ...     # nccl on GPUs, gloo on CPU

train.py keeps the part that decides the math: every rank draws the whole global batch from one
generator seeded alike and keeps rows rank::world, so N ranks see exactly the batch one process
would. What lives here is the rest: joining the process group, deciding things together (stop on a
signal, a NaN or the time limit at the same step on every rank, or DDP would hang), averaging the
logged loss, and each rank's RNG state for exact resume.
"""
import os

import torch
import torch.distributed as dist

from common import pick_device


def setup_ddp(device_flag):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_flag)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def any_rank(flags, world, device):
    """Element-wise OR over ranks: all ranks must stop (or fail) at the same step, or DDP would hang."""
    if world == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_over_ranks(value, world, device):
    """The average of a float over ranks (the logged loss)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


def rng_state(device):
    """This rank's global RNG state (it draws the label dropout), saved in the checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_states(world, device):
    """Every rank's RNG state, in rank order (rank 0 writes them all into the checkpoint)."""
    if world == 1:
        return [rng_state(device)]
    states = [None] * world
    dist.all_gather_object(states, {k: v.cpu() for k, v in rng_state(device).items()})
    return states


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
