"""Which GPU each stage-1 dask worker uses: one worker per GPU unless asked for more.

A worker learns its device in one of three ways, and ``assigned_device()`` reads the answer:

    LocalCUDACluster   (here, dask-cuda installed, one worker per GPU) dask-cuda gives each worker
                       CUDA_VISIBLE_DEVICES with its own GPU first ("2,3,0,1"), so its GPU is
                       cuda:0; start_cluster also sets XMEI_DEVICE=cuda:0 in every worker.
    DevicePlugin       (here, otherwise) a LocalCluster whose worker i is given devices[i] by a
                       worker plugin that runs before the worker takes any task.
    a farm worker      (``--scheduler ADDRESS``) the worker declares its own GPU: XMEI_DEVICE=cuda:N,
                       a CUDA_VISIBLE_DEVICES of one GPU, or ``dask cuda worker``; check_farm
                       reads every worker's declaration and refuses two workers on one GPU.

    devices = worker_devices(cfg.extract.device, workers, workers_per_gpu, torch.cuda.device_count())
    with start_cluster(devices) as cluster, Client(cluster) as client:
        ...                                   # in a task: assigned_device() or cfg.extract.device

Device strings are local to the process that reads them: "cuda:1" is the second GPU that
process sees (after CUDA_VISIBLE_DEVICES). torch is imported only inside functions.
"""
from __future__ import annotations

import os
import re
import socket
from typing import TYPE_CHECKING

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from xmei.errors import UserError

if TYPE_CHECKING:
    from distributed import LocalCluster, Worker

__all__ = ["DevicePlugin", "FarmError", "assigned_device", "check_farm", "start_cluster", "worker_devices",
           "worker_gpu_info"]

DEVICE_ENV = "XMEI_DEVICE"  # how a farm worker declares its GPU, e.g. XMEI_DEVICE=cuda:3
_assigned: str | None = None  # set in a worker process by DevicePlugin.setup


class FarmError(UserError, ValueError):
    """A worker layout that would put two workers on one GPU, or a GPU worker that does not say
    which GPU is its own."""


def _gpu_index(device: str) -> int | None:
    """N of "cuda:N"; None for "cuda" (no GPU named); FarmError for anything else."""
    if device == "cuda":
        return None
    if not (m := re.fullmatch(r"cuda:(\d+)", device)):
        raise FarmError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    return int(m[1])


def worker_devices(device: str, workers: int | None, workers_per_gpu: int, gpu_count: int) -> list[str]:
    """The device string of each LocalCluster worker, by worker index.

    ``device`` is extract.device (auto | cpu | cuda | cuda:N); ``workers`` None means one per
    GPU slot (gpu_count * workers_per_gpu), or 1 on the CPU. GPUs are dealt round-robin (worker i
    gets cuda:{i % gpu_count}), so fewer workers than slots still spread over every GPU and no
    GPU gets more than ``workers_per_gpu``. "cuda:N" puts every worker on GPU N.
    """
    if workers_per_gpu < 1:
        raise FarmError(f"workers_per_gpu is {workers_per_gpu}; it must be at least 1")
    if workers is not None and workers < 1:
        raise FarmError(f"{workers} workers: a cluster needs at least 1")
    if device == "cpu" or (device == "auto" and gpu_count == 0):
        return ["cpu"] * (workers or 1)
    index = None if device == "auto" else _gpu_index(device)
    if gpu_count == 0:
        raise FarmError(f"device {device!r}: this machine has no GPU; use extract.device=auto or cpu")
    if index is not None and index >= gpu_count:
        raise FarmError(f"device {device!r}: this machine has {gpu_count} GPU(s): cuda:0..cuda:{gpu_count - 1}")
    gpus = [index] if index is not None else list(range(gpu_count))
    slots = len(gpus) * workers_per_gpu
    workers = slots if workers is None else workers
    if workers > slots:
        raise FarmError(f"{workers} workers on {len(gpus)} GPU(s) at {workers_per_gpu} per GPU would share a GPU; "
                        f"use at most {slots} workers, or raise workers_per_gpu to {-(-workers // len(gpus))}")
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(workers)]


class DevicePlugin(WorkerPlugin):
    """Gives LocalCluster worker i (worker names are 0, 1, ...) the device devices[i].

    Passed to the workers at start (``plugins=``), so setup runs before a worker joins the
    scheduler, hence before any task. It sets what assigned_device() returns and, for a GPU
    when torch sees one, makes it torch's current device.
    """

    name = "xmei-device"

    def __init__(self, devices: list[str]):
        self.devices = list(devices)

    def setup(self, worker: Worker) -> None:
        global _assigned
        index = worker.name
        if not isinstance(index, int) or not 0 <= index < len(self.devices):
            raise FarmError(f"worker {worker.name!r} at {worker.address} has no device: this cluster's "
                            f"DevicePlugin knows workers 0..{len(self.devices) - 1} ({', '.join(self.devices)})")
        device = self.devices[index]
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(device)
        _assigned = device

    def teardown(self, worker: Worker) -> None:
        global _assigned
        _assigned = None


def assigned_device() -> str | None:
    """The device this process was given: by DevicePlugin, else XMEI_DEVICE (how a farm worker,
    or a LocalCUDACluster worker, declares its GPU), else None: extract.device applies."""
    return _assigned or os.environ.get(DEVICE_ENV) or None


def worker_gpu_info(dask_worker: Worker | None = None) -> dict:
    """What check_farm needs from one worker; run on each worker with ``client.run``, which
    passes ``dask_worker``. "dask_cuda" says dask-cuda started it (its GPU is then the first of
    CUDA_VISIBLE_DEVICES)."""
    import torch

    plugins = dask_worker.plugins.values() if dask_worker is not None else ()
    return {"host": socket.gethostname(), "assigned": assigned_device(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": torch.cuda.device_count(),
            "dask_cuda": any(type(p).__module__.startswith("dask_cuda") for p in plugins)}


def _farm_gpu(info: dict, device: str) -> tuple[str | None, str | None]:
    """(the worker's physical GPU id or None for the CPU, the problem or None)."""
    assigned = info.get("assigned") or ""
    visible = [v.strip() for v in (info.get("visible") or "").split(",") if v.strip()]
    seen = info.get("gpus", 0)
    if assigned == "cpu" or (seen == 0 and device == "auto" and not assigned):
        return None, None
    if seen == 0:
        asked = f"{DEVICE_ENV} is {assigned!r}" if assigned else f"extract.device is {device!r}"
        return None, f"sees no GPU but {asked}"
    try:
        index = _gpu_index(assigned) if assigned else None
    except FarmError:
        return None, f"declares {DEVICE_ENV}={assigned!r}; expected cpu or cuda:N"
    if index is None and device.startswith("cuda:"):
        index = _gpu_index(device)
    if index is None and (seen == 1 or info.get("dask_cuda")):
        index = 0  # its only GPU, or the one dask-cuda put first
    if index is None:
        return None, (f"sees {seen} GPUs ({info.get('visible') or 'all'}) and declares none of them; start it with "
                      f"{DEVICE_ENV}=cuda:N or CUDA_VISIBLE_DEVICES=N, or with `dask cuda worker`")
    if index >= seen:
        return None, f"uses cuda:{index} but sees {seen} GPU(s)"
    return (visible[index] if index < len(visible) else str(index)), None


def check_farm(infos: dict[str, dict], device: str, workers_per_gpu: int) -> None:
    """Refuse a farm (``--scheduler ADDRESS``) where a GPU worker does not say which GPU is its
    own, or where more than ``workers_per_gpu`` workers share one GPU of one host.

    ``infos`` is ``client.run(worker_gpu_info)``: {worker address: info}. A worker's GPU is its
    XMEI_DEVICE (else extract.device's cuda:N, else its only GPU), read through its
    CUDA_VISIBLE_DEVICES. Every problem is reported in one FarmError.
    """
    if device == "cpu":
        return
    problems, on_gpu = [], {}
    for address, info in sorted(infos.items()):
        gpu, problem = _farm_gpu(info, device)
        if problem:
            problems.append(f"worker {address} on {info.get('host')} {problem}")
        elif gpu is not None:
            on_gpu.setdefault((info.get("host"), gpu), []).append(address)
    for (host, gpu), addresses in sorted(on_gpu.items()):
        if len(addresses) > workers_per_gpu:
            problems.append(f"GPU {gpu} of {host} has {len(addresses)} workers ({', '.join(addresses)}) "
                            f"at {workers_per_gpu} per GPU; give each its own GPU or raise workers_per_gpu")
    if problems:
        raise FarmError("the dask farm cannot run stage 1:\n  " + "\n  ".join(problems))


def start_cluster(devices: list[str]) -> LocalCluster:
    """A local cluster of one worker per entry of ``devices`` (from worker_devices), each
    pinned to its device. Use it as a context manager (closing it stops every worker):

        with start_cluster(devices) as cluster, Client(cluster) as client: ...

    One worker per GPU with dask-cuda installed: a LocalCUDACluster on those GPUs. Otherwise
    (the CPU, several workers per GPU, no dask-cuda): a LocalCluster with DevicePlugin.
    """
    if not devices:
        raise FarmError("start_cluster was given no devices: a cluster needs at least 1 worker")
    for device in devices:
        if device != "cpu" and _gpu_index(device) is None:
            raise FarmError(f"device {device!r}: a worker's device is cpu or one GPU, cuda:N")
    gpus = [d.removeprefix("cuda:") for d in devices]
    if all(d.startswith("cuda:") for d in devices) and len(set(gpus)) == len(gpus):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            # this process's CUDA_VISIBLE_DEVICES renumbers its GPUs; dask-cuda wants their real ids
            parent = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            ids = [parent[int(g)] if parent else g for g in gpus]
            # dask-cuda replaces the workers' env= and plugins=; the nanny's config environ survives
            with dask.config.set({"distributed.nanny.environ": {
                    **dask.config.get("distributed.nanny.environ"), DEVICE_ENV: "cuda:0"}}):
                return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(ids), n_workers=len(ids),
                                        threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    from distributed import LocalCluster

    return LocalCluster(n_workers=len(devices), threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0", plugins=(DevicePlugin(devices),))
