"""Where a process runs, in which precision, and how it talks to the others: the device policy,
the precision recipe and the process group.

One policy for every command (train, eval, predict, attention, the benches), from ``run.device``:

    auto     the local rank's GPU (LOCAL_RANK < visible GPUs), or the only GPU the process sees
             (a per-rank CUDA_VISIBLE_DEVICES, as ``srun --gpus-per-task=1`` gives), or the CPU
             when it sees none; any other layout is an error naming LOCAL_RANK and the visible
             devices, never a silent fall-back to the CPU (ranks on NCCL and ranks on gloo hang).
    cpu      the CPU
    cuda     the local rank's GPU (an error without one)
    cuda:N   GPU N (an error when there is no such GPU)

A launcher sets RANK / WORLD_SIZE / LOCAL_RANK (``torchrun``, ``deepspeed``, whose extra
``--local_rank=N`` argument the CLI accepts); under SLURM without one, SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID are read instead (MASTER_ADDR / MASTER_PORT must then be set by the job script).
Without any, the process is rank 0 of 1. Several processes join one group: NCCL between GPUs,
gloo between CPUs.

Precision (``run.precision``; :func:`resolve_precision`) means the same on a GPU and on the CPU:
``bf16`` loads the frozen weights in bf16 and runs the forward under ``torch.autocast(bf16)``,
while every trainable weight (LQ-Formers, projections, LoRA, ``lora_modules_to_save`` copies, a
whole LLM being trained) stays fp32, with fp32 gradients and fp32 optimizer state, in either
engine; ``fp32`` is fp32 throughout. ``auto`` is bf16 on a GPU that supports it, else fp32.

    dist = Distributed.start(cfg.run.device)
    dist.device; dist.rank; dist.world
    total = dist.all_sum(torch.tensor([loss_sum, tokens]))   # the same on every rank
    rows = dist.gather(my_rows)                               # rank 0: every rank's list; others: None
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from xmei.errors import UserError

__all__ = ["DeviceError", "Distributed", "PRECISIONS", "frozen_names", "launcher_env", "resolve_device",
           "resolve_precision", "single_process_env", "unbroadcast_frozen", "weights_checksum"]

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


class DeviceError(UserError, ValueError):
    """A device that this machine does not have, or a spec that names none."""


def _visible() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "all")


def resolve_device(spec: str = "auto", local_rank: int = 0, world: int = 1) -> torch.device:
    """The device of ``spec`` (auto | cpu | cuda | cuda:N) for the process of ``local_rank``, one
    of ``world`` processes (see the module docstring for ``auto``)."""
    spec = str(spec).strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if gpus == 0:
            return torch.device("cpu")
        if local_rank < gpus:
            return torch.device(f"cuda:{local_rank}")
        if gpus == 1:  # a per-rank CUDA_VISIBLE_DEVICES: this rank's GPU is the one it sees
            return torch.device("cuda:0")
        raise DeviceError(f"run.device auto: this is LOCAL_RANK {local_rank} of {world} processes, but it sees "
                          f"{gpus} GPU(s) (CUDA_VISIBLE_DEVICES={_visible()}), so it has no GPU of its own; start "
                          "one process per GPU (e.g. torchrun --nproc_per_node N with N at most the GPUs), or give "
                          "each rank one GPU (CUDA_VISIBLE_DEVICES), or set run.device=cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = local_rank if spec == "cuda" else spec.partition(":")[2]
        if not str(index).isdigit():
            raise DeviceError(f"device {spec!r}: expected cuda:N with N a GPU number, e.g. cuda:0")
        if spec == "cuda" and world > 1 and gpus == 1:
            index = 0  # a per-rank CUDA_VISIBLE_DEVICES
        if int(index) >= gpus:
            raise DeviceError(f"device {spec!r}: this machine has {gpus} GPU(s) visible"
                              + (f" and this is local rank {local_rank}" if spec == "cuda" else "")
                              + "; use run.device=auto or cpu")
        return torch.device(f"cuda:{int(index)}")
    raise DeviceError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_precision(run, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype of the config's ``run`` section on ``device``: ``run.precision`` (auto |
    bf16 | fp32), fp32 when ``run.amp`` (the published config's mixed-precision switch) is false.
    bf16 on a GPU without it is an error."""
    device, precision = torch.device(device), run.precision
    if not run.amp or precision == "fp32":
        return torch.float32
    # natively only: older GPUs (V100, T4) emulate bf16 at a fraction of their speed
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if device.type == "cuda" and not cuda_bf16:
        raise DeviceError(f"run.precision bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                          "use run.precision=fp32 (or auto)")
    return PRECISIONS[precision]


def launcher_env() -> dict[str, str]:
    """Under SLURM without a launcher (``srun xmei train ...``), set RANK / WORLD_SIZE / LOCAL_RANK
    from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, as a launcher would (DeepSpeed reads them
    too). A launcher's variables win. Returns what it set."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) <= 1 or "SLURM_PROCID" not in os.environ:
        return {}
    values = {k: os.environ[v] for k, v in SLURM_VARS.items() if v in os.environ and k not in os.environ}
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DeviceError(f"a SLURM job of {os.environ['SLURM_NTASKS']} tasks without a launcher needs "
                          f"{' and '.join(missing)} set in the job script (e.g. export MASTER_ADDR=$(scontrol "
                          "show hostnames $SLURM_JOB_NODELIST | head -n 1) MASTER_PORT=29500), or start it "
                          "with torchrun")
    os.environ.update(values)
    return values


def single_process_env() -> dict[str, str]:
    """Set the launcher's variables that a run of one process lacks (DeepSpeed needs all five;
    without them it falls back to MPI discovery). A launcher's run of several processes is left
    as it is, and so is a SLURM job's (:func:`launcher_env`). Returns what it set."""
    launcher_env()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    values = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(values)
    return values


def weights_checksum(module: nn.Module, frozen: bool = True, chunk: int = 2**26) -> int:
    """An exact checksum of the bits of the frozen (or trainable) weights, computed on their device
    ``chunk`` bytes at a time: per parameter the sum of its bytes, weighted by the parameter's
    place. Equal weights give equal sums on any hardware (no float rounding); it costs one read."""
    total = 0
    for place, p in enumerate(module.parameters(), 1):
        if p.requires_grad == frozen:
            continue
        data = p.detach().contiguous().view(-1).view(torch.uint8)
        total += place * sum(int(data[i:i + chunk].sum(dtype=torch.int64)) for i in range(0, data.numel(), chunk))
    return total % 2**64


@contextmanager
def unbroadcast_frozen(module: nn.Module) -> Iterator[None]:
    """Inside, DeepSpeed's start-up broadcast of every parameter from rank 0 skips the frozen ones
    (15 GB for a 7B LLM that every rank has read from the same files): they carry DeepSpeed's own
    marker for weights each rank holds itself (``ds_optim_param``, read only by that broadcast and
    by its OptimizedLinear offload, which this model has none of), removed on leaving."""
    frozen = [p for p in module.parameters() if not p.requires_grad and not hasattr(p, "ds_optim_param")]
    for p in frozen:
        p.ds_optim_param = True
    try:
        yield
    finally:
        for p in frozen:
            del p.ds_optim_param


def frozen_names(module: nn.Module) -> list[str]:
    """Names of the frozen parameters: DistributedDataParallel's ignore list, so that its start-up
    broadcast sends only the trainable ones."""
    return [name for name, p in module.named_parameters() if not p.requires_grad]


@dataclass
class Distributed:
    """This process's place among the ranks, and the collectives the loops need."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def start(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Distributed":
        """Read the launcher's (or SLURM's) variables, pick the device, and join the process group
        when there are several processes (a no-op when the group exists already)."""
        launcher_env()
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device, local_rank, world)
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

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if not self.active:
            return [obj]
        received = [None] * self.world
        tdist.all_gather_object(received, obj)
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
