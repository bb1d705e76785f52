"""Data-parallel training over several processes with torch.distributed, launched by torchrun.

    torchrun --nproc-per-node 2 -m fashion_cnn train seed-model1 --out runs/ddp
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29400 -m fashion_cnn train fast

Every process draws the same shuffle, takes its share of each batch (the batch size stays the
global one, as a single process would use it) and weights its loss so that the gradient, which
DistributedDataParallel averages over the processes, is the gradient of the whole batch. Process
0 validates, writes the run directory, its checkpoints and figures, evaluates on the test set
and prints; the others only train. Augmentation and dropout draw from per-process generators,
so the masks differ from a single process's, and a checkpoint holds every process's generator
state: `torchrun ... -m fashion_cnn resume RUN` with the same number of processes continues
exactly. BatchNorm statistics are those of each process's share (and the running averages
process 0's), as with DistributedDataParallel's defaults. CPU processes talk over gloo; on
CUDA each process takes the GPU of its LOCAL_RANK and the processes talk over NCCL, as torchrun
users expect.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def launched_processes() -> int:
    """How many processes torchrun started for this command (WORLD_SIZE); 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index among the processes on its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup_from_env(device: torch.device | None = None) -> int:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1);
    the number of processes. On CUDA (`device`) each process uses the GPU of its LOCAL_RANK
    and NCCL; on the CPU gloo, and each process uses its share of this machine's cores."""
    if launched_processes() > 1 and not dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return world()[1]


def process_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and launched_processes() > 1:
        return torch.device("cuda", local_rank())
    return device


def _uses_nccl() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"


def default_threads() -> int:
    """Threads per process: this machine's cores shared among its processes (torchrun sets
    LOCAL_WORLD_SIZE), at least one."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local))


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all processes (sum, max or min); a no-op in a single process."""
    if world()[1] > 1:
        op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        if _uses_nccl() and tensor.device.type != "cuda":  # NCCL reduces GPU tensors only
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=op)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=op)
    return tensor


def barrier() -> None:
    """Wait for every process here; a no-op in a single process."""
    if world()[1] > 1:
        dist.barrier()


def broadcast(obj):
    """Process 0's `obj`, on every process."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    size = world()[1]
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def shutdown(succeeded: bool) -> None:
    """Leave the process group at the end of a command. After a success every process waits
    for the others (process 0 still writing its figures, say) and the group closes in order:
    a process that simply exits can make gloo abort a peer that is still talking to it. After
    a failure nothing is waited for (the others may be inside a collective that will never
    complete); torchrun ends them."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
        dist.destroy_process_group()
