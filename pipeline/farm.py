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

Before any shard runs, the driver also learns from each worker (``worker_gpu_info``, or
``local_infos`` for a LocalCluster it is about to start) its host, its cores and the dtype
``extract.precision: auto`` gives on its device: ``compute_dtype`` makes that one dtype for the
whole store (workers that disagree are refused), ``decode_shares`` deals each node's cores among
that node's workers.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from xmei.errors import UserError

if TYPE_CHECKING:
    from distributed import LocalCluster, Worker

__all__ = ["PRECISIONS", "DevicePlugin", "FarmError", "QuietTaskErrors", "assigned_device", "auto_dtype", "check_dtype",
           "check_farm", "compute_dtype", "decode_shares", "local_device", "local_infos", "start_cluster",
           "worker_devices", "worker_gpu_info"]

DEVICE_ENV = "XMEI_DEVICE"  # how a farm worker declares its GPU, e.g. XMEI_DEVICE=cuda:3
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # extract.precision -> torch dtype name
_assigned: str | None = None  # set in a worker process by DevicePlugin.setup


class FarmError(UserError, ValueError):
    """A worker layout that would put two workers on one GPU, a GPU worker that does not say
    which GPU is its own, or workers that cannot all compute in the store's one dtype."""


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


class QuietTaskErrors(WorkerPlugin):
    """Keeps the workers of a cluster xmei started from logging the error of an xmei task
    ("Compute Failed", with its traceback): the driver reports every task's error itself, a
    user's in one line (a full disk, a machine error, --strict), a bug with its traceback."""

    name = "xmei-quiet-task-errors"

    def setup(self, worker: Worker) -> None:
        logging.getLogger("distributed.worker").addFilter(_not_an_xmei_task_error)


def _not_an_xmei_task_error(record: logging.LogRecord) -> bool:
    """False for a worker's log of an xmei task that failed (its key begins with "xmei-")."""
    failed = isinstance(record.msg, str) and record.msg.startswith("Compute Failed")
    return not (failed and isinstance(record.args, tuple) and str(record.args[0]).startswith("xmei-"))


def assigned_device() -> str | None:
    """The device this process was given: by DevicePlugin, else XMEI_DEVICE (how a farm worker,
    or a LocalCUDACluster worker, declares its GPU), else None: extract.device applies."""
    return _assigned or os.environ.get(DEVICE_ENV) or None


def local_device(device: str) -> str:
    """The device this process computes on: the one it was given (assigned_device), else
    ``device`` (extract.device), "auto" being its GPU when it sees one, else the CPU."""
    import torch

    device = assigned_device() or device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def auto_dtype(device: str) -> str | None:
    """What extract.precision auto computes in on ``device`` of this process (auto | cpu | cuda |
    cuda:N): bfloat16 on a GPU that computes in it natively, float16 on an older GPU, float32 on
    the CPU; None for a GPU this process does not see."""
    import torch

    device = "cuda" if device == "auto" and torch.cuda.is_available() else device
    if device in ("auto", "cpu"):
        return "float32"
    index = _gpu_index(device)
    if not torch.cuda.is_available() or (index or 0) >= torch.cuda.device_count():
        return None
    with torch.cuda.device(torch.cuda.current_device() if index is None else index):
        # natively only: older GPUs emulate bf16 at a fraction of their fp16 speed
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"


def check_dtype(device: str, dtype: str) -> None:
    """A FarmError unless this process's ``device`` computes in ``dtype`` (bfloat16 needs a GPU
    that computes in it natively; the CPU and any GPU take float16 and float32)."""
    if dtype == "bfloat16" and auto_dtype(device) == "float16":
        import torch

        raise FarmError(f"{device} ({torch.cuda.get_device_name(device)}) does not compute in bfloat16 natively; "
                        "set extract.precision to fp16 or fp32 (a store's resume needs the dtype it was made in)")


def _cpus() -> list[int]:
    """The cores this process may run on (its CPU affinity, which a farm's launcher may limit)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def worker_gpu_info(device: str = "auto", dask_worker: Worker | None = None) -> dict:
    """What the driver needs from one worker, ``device`` being extract.device; run on each worker
    with ``client.run(worker_gpu_info, device)``, which passes ``dask_worker``. "dask_cuda" says
    dask-cuda started it (its GPU is then the first of CUDA_VISIBLE_DEVICES); "cpus" are its cores,
    "dtype" what extract.precision auto gives on its device (None: a GPU it does not see)."""
    import torch

    plugins = dask_worker.plugins.values() if dask_worker is not None else ()
    return {"host": socket.gethostname(), "assigned": assigned_device(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": torch.cuda.device_count(),
            "dask_cuda": any(type(p).__module__.startswith("dask_cuda") for p in plugins),
            "cpus": _cpus(), "dtype": auto_dtype(local_device(device))}


def local_infos(devices: list[str]) -> dict[str, dict]:
    """What worker_gpu_info will say of the workers of a LocalCluster (or of this process) on
    ``devices``, known before any starts: the host and cores are this machine's."""
    return {f"local worker {i} ({device})": {"host": socket.gethostname(), "cpus": _cpus(), "dtype": auto_dtype(device)}
            for i, device in enumerate(devices)}


def compute_dtype(infos: dict[str, dict], precision: str) -> str:
    """The one dtype every worker computes in, for extract.precision (auto | bf16 | fp16 | fp32);
    ``infos``: worker_gpu_info (or local_infos) by worker. A FarmError names the workers when
    auto gives them different dtypes, or when bf16 is asked of GPUs without it."""
    on: dict[str | None, list[str]] = {}  # what auto gives -> workers
    for worker, info in sorted(infos.items()):
        on.setdefault(info["dtype"], []).append(worker)
    if precision != "auto":
        if precision == "bf16" and "float16" in on:
            raise FarmError(f"extract.precision is bf16 but the GPUs of {', '.join(on['float16'])} do not compute "
                            "in bfloat16 natively; set extract.precision to fp16 or fp32")
        return PRECISIONS[precision]
    if len(on) > 1:
        found = "; ".join(f"{dtype} on {', '.join(workers)}" for dtype, workers in on.items())
        raise FarmError(f"extract.precision auto gives the workers different dtypes ({found}), and a store holds "
                        "one; set extract.precision to one that every worker computes in (fp16 or fp32)")
    return next(iter(on))


def decode_shares(infos: dict[str, dict]) -> dict[str, int]:
    """Decode processes per worker by host, for extract.decode_workers 0: the cores of each host
    (all its workers' CPU affinities together) divided among its workers, at least 1 each.
    ``infos``: worker_gpu_info (or local_infos) by worker."""
    workers = Counter(info["host"] for info in infos.values())
    cores: dict[str, set[int]] = {}
    for info in infos.values():
        cores.setdefault(info["host"], set()).update(info["cpus"])
    return {host: max(1, len(cores[host]) // n) for host, n in workers.items()}


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
    """Refuse a farm (``--scheduler ADDRESS``) without workers, or where a GPU worker does not say
    which GPU is its own, or where more than ``workers_per_gpu`` workers share one GPU of one host.

    ``infos`` is ``client.run(worker_gpu_info)``: {worker address: info}. A worker's GPU is its
    XMEI_DEVICE (else extract.device's cuda:N, else its only GPU), read through its
    CUDA_VISIBLE_DEVICES. Every problem is reported in one FarmError.
    """
    if not infos:  # nothing would ever run the shards, nor say what dtype they compute in
        raise FarmError("the dask scheduler has no workers: start them first (e.g. `dask worker ADDRESS`, one per "
                        "GPU), then run xmei extract --scheduler again")
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
    (the CPU, several workers per GPU, no dask-cuda): a LocalCluster with DevicePlugin. Either
    way its processes leave Ctrl-C to this one (:func:`_ctrl_c_to_the_driver`).
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
                    **dask.config.get("distributed.nanny.environ"), DEVICE_ENV: "cuda:0"}}), _ctrl_c_to_the_driver():
                return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(ids), n_workers=len(ids),
                                        threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    from distributed import LocalCluster

    with _ctrl_c_to_the_driver():
        return LocalCluster(n_workers=len(devices), threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address="127.0.0.1:0", plugins=(DevicePlugin(devices),))


@contextmanager
def _ctrl_c_to_the_driver() -> Iterator[None]:
    """Worker processes started inside ignore SIGINT (an ignored signal stays ignored across exec,
    and then neither Python nor asyncio installs its KeyboardInterrupt handler). Ctrl-C reaches
    every process of the terminal's group: the driver alone decides how the run stops
    (pipeline.extract: at a shard boundary), where a worker would die of it with a traceback and
    its nanny, taking that for a close, would not restart it. The driver ignores a Ctrl-C while
    its cluster starts. SIGTERM is left as it is: a worker dies of it silently, its shard stays
    pending and its nanny starts another; SIGTERM may not be missed, it is how a job is preempted."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
