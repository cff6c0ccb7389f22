"""Where a process runs and how it talks to the others: the device policy and the process group.

One policy for every command (train, eval, predict, attention, the benches), from ``run.device``:

    auto     the local rank's GPU when there is one, else the CPU
    cpu      the CPU
    cuda     the local rank's GPU (an error without one)
    cuda:N   GPU N (an error when there is no such GPU)

A launcher (``torchrun``, ``deepspeed``) sets RANK / WORLD_SIZE / LOCAL_RANK; without one the
process is rank 0 of 1. Several processes join one group: NCCL between GPUs, gloo between CPUs.

    dist = Distributed.start(cfg.run.device)
    dist.device; dist.rank; dist.world
    total = dist.all_sum(torch.tensor([loss_sum, tokens]))   # the same on every rank
    rows = dist.gather(my_rows)                               # rank 0: every rank's list; others: None
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from xmei.errors import UserError

__all__ = ["DeviceError", "Distributed", "llm_dtype", "resolve_device", "single_process_env"]

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DeviceError(UserError, ValueError):
    """A device that this machine does not have, or a spec that names none."""


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of ``spec`` (auto | cpu | cuda | cuda:N) for the process of ``local_rank``."""
    spec = str(spec).strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if local_rank < gpus else torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = local_rank if spec == "cuda" else spec.partition(":")[2]
        if not str(index).isdigit():
            raise DeviceError(f"device {spec!r}: expected cuda:N with N a GPU number, e.g. cuda:0")
        if int(index) >= gpus:
            raise DeviceError(f"device {spec!r}: this machine has {gpus} GPU(s) visible"
                              + (f" and this is local rank {local_rank}" if spec == "cuda" else "")
                              + "; use run.device=auto or cpu")
        return torch.device(f"cuda:{int(index)}")
    raise DeviceError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


def llm_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on the CPU (bf16 matmuls there are slow and the tiny models are fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def single_process_env() -> dict[str, str]:
    """Set the launcher's variables that a run of one process lacks (DeepSpeed needs all five;
    without them it falls back to MPI discovery). A launcher's run of several processes is left
    as it is. Returns what it set."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    values = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(values)
    return values


@dataclass
class Distributed:
    """This process's place among the ranks, and the collectives the loops need."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def start(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Distributed":
        """Read the launcher's variables, pick the device, and join the process group when there
        are several processes (a no-op when the group exists already)."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                     timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local_rank, dev)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and reports."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and tdist.is_initialized()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over all ranks (a copy on every rank)."""
        out = values.detach().to(self.device, torch.float64).clone()  # the device the backend talks on
        if self.active:
            tdist.all_reduce(out)
        return out.cpu()

    def gather(self, obj: Any) -> list[Any] | None:
        """Rank 0 receives every rank's ``obj`` in rank order; the others get None."""
        if not self.active:
            return [obj]
        received = [None] * self.world if self.main else None
        tdist.gather_object(obj, received, dst=0)
        return received

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active:
            tdist.destroy_process_group()
