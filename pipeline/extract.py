"""Stage 1 driver: annotations + media -> a feature store, shard by shard, on a dask cluster.

A task extracts and writes one whole shard, so no two workers ever write the same files and
no lock is needed between them (between two runs into one store: `xmei extract` holds the
store's lock, xmei.runlock). A worker loads the encoders and starts its decode processes once
and keeps them (pipeline.decode_pool); when extract.decode_workers is 0, the driver deals each
node's cores among that node's workers (pipeline.farm.decode_shares). Within a task, the decode
processes prepare clips a bounded number ahead while the encoders work on the previous batch.
Task keys and progress events name the store, so extractions into several stores share one
scheduler. Before any shard runs, the driver resolves extract.precision to one dtype for the
whole store (recorded in it; a resume in another dtype is refused).

A rerun skips finished shards; a clip whose media are missing or corrupt, or whose decoder
crashes, or that an encoder refuses, is marked failed with its reason, never replaced. An error
of the machine (a CUDA error, out of memory on one clip, a GPU gone: encoders.machine_fault) is
no clip's: the task ends with a MachineError before anything of its shard is written, it is tried
again on another worker (RETRIES), and its clips stay pending for a rerun. A full disk is no
clip's either, nor a worker's: the first shard that meets it ends the whole run with a
DiskFullError (its status unwritten, so its clips stay pending), never retried elsewhere. Before
any shard runs, the driver checks that the store's filesystem has room for the features still to
extract (refused when it clearly has not, a warning when it is close).

A stop request (``stop``: SIGTERM / SIGINT, see xmei.interrupt) ends the run at a shard boundary:
no shard starts after it (on a cluster a dask Event tells the tasks not yet begun to return at
once), the shards being extracted finish and are written, and the run ends with Interrupted
saying how many shards are kept and that the same command resumes. Shards still running when the
grace runs out (or at a second signal) are abandoned unwritten, so they stay pending: the driver
stops, and closing its LocalCluster stops their workers (a farm's workers finish them, or not, on
their own).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.annotations import FIELDS, Record, read_annotations
from pipeline.decode_pool import Clip, DecodePool, Failure, Prepared, available_cores
from pipeline.encoders import (EncoderSettings, Encoders, encoder_identity, feature_specs, machine_fault,
                               preparation, tokenize_captions)
from pipeline.farm import (PRECISIONS, QuietTaskErrors, check_farm, compute_dtype, decode_shares, local_device,
                           local_infos, start_cluster, worker_devices, worker_gpu_info)
from stores import FAILED, OK, FeatureStore, StoreError, create_store
from stores.location import Location, use_endpoint
from stores.store import clip_bytes, store_exists
from xmei.errors import DiskFullError, UserError, check_space
from xmei.interrupt import Interrupted, StopRequest

__all__ = ["ExtractWarning", "ExtractionError", "ExtractSummary", "MachineError", "extract", "extract_shard"]

MODEL_KEYS = ("model.visual_encoder_path", "model.acoustic_encoder_path", "model.caption_tokenizer_path")
AHEAD_BATCHES = 2
RETRIES = 2  # a shard task that met a machine error runs up to twice more, on other workers where there are any


class ExtractionError(UserError, RuntimeError):
    """A clip failed under --strict."""


class MachineError(UserError, RuntimeError):
    """The machine failed, not a clip (a CUDA error, out of memory on one clip, a GPU gone): the
    message names the worker and the error; the shard's clips stay pending for a rerun.
    ``worker``: the dask worker's address (None in this process)."""

    worker: str | None = None


class ExtractWarning(UserWarning):
    """Something a run goes on with but should say (a store that does not record its dtype)."""


@dataclass(frozen=True)
class ShardJob:
    store: str
    shard: int
    clips: list[tuple[str, str, str]]  # (video_id, video file, audio file or "" for the video's track)
    settings: EncoderSettings
    strict: bool
    decode_processes: dict[str, int] = field(default_factory=dict)  # by host: each worker's share of its cores
    endpoint_url: str | None = None  # stores.endpoint_url: a farm's workers open an s3:// store there too


@dataclass
class ExtractSummary:
    store: str  # a folder (absolute) or a URL
    clips: int
    shards: int
    shards_skipped: int  # finished by an earlier run
    ok: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str | None = None
    space: str | None = None  # a warning: the store's filesystem has little more room than the shards to do need


def extract(cfg, annotations: Path, media_root: Path, out: str | Path, split: str | None = None,
            scheduler: str | None = None, workers: int | None = None, strict: bool = False, unlabeled: bool = False,
            progress: Callable[[int, int], None] | None = None,
            on_start: Callable[[ExtractSummary], None] | None = None,
            stop: StopRequest | None = None) -> ExtractSummary:
    """Extract every clip of ``annotations`` into the store ``out`` (created, or resumed): a folder,
    or a URL of object storage (stores.location) that every worker reaches.

    ``workers`` = 0 runs in this process without dask; otherwise a LocalCluster on 127.0.0.1 of
    that many workers (None: one per GPU slot, see pipeline.farm; 1 on a CPU machine), each
    pinned to its own GPU, unless ``scheduler`` names an existing cluster (whose workers must
    each declare their GPU). Workers share their node's cores for decoding unless
    extract.decode_workers says how many each one starts.
    ``progress(clips, failed)`` is called after each encoder batch and each failed clip;
    ``on_start(summary)`` once the work is known (and the dashboard address, on a cluster).
    A MachineError ends the run naming the worker and its error, a DiskFullError naming the
    filesystem; the finished shards are kept and the same call again completes the rest. So does a
    ``stop`` request (module docstring), with Interrupted.
    """
    cfg.require_paths(MODEL_KEYS)
    # workers of a farm need absolute paths (their working folder is not ours)
    out, media_root = Location.parse(out).absolute(), Path(media_root).resolve()
    records = read_annotations(annotations, cfg.emotions, cfg.intents, media_root=None, labeled=not unlabeled,
                               allow_absolute=cfg.extract.allow_absolute_paths)
    x, client = cfg.extract, None
    with ExitStack() as stack:
        if scheduler is None:  # a GPU this machine lacks is one error here, not one in every worker
            devices = worker_devices(x.device, 1 if workers == 0 else workers, x.workers_per_gpu, _gpu_count())
            # this process computes on its own device (XMEI_DEVICE may pin it); local workers get theirs by plugin
            infos = local_infos([local_device(x.device)] if workers == 0 else devices)
        else:
            from distributed import Client

            client = stack.enter_context(Client(scheduler))
            infos = client.run(worker_gpu_info, x.device)
            check_farm(infos, x.device, x.workers_per_gpu)  # never two workers on one GPU unless asked
        settings = replace(EncoderSettings.from_config(cfg), compute_dtype=compute_dtype(infos, x.precision))
        store = _open_or_create(cfg, out, records, settings, split or Path(annotations).stem, annotations)
        done = store.done_shards()
        shares = {} if x.decode_workers else decode_shares(infos)
        jobs = [ShardJob(out, k, [_clip_files(records[i], media_root) for i in store.shard_range(k)], settings,
                         strict, shares, cfg.stores.endpoint_url) for k in range(store.num_shards) if k not in done]
        summary = ExtractSummary(out, len(records), store.num_shards, len(done), space=_check_space(store, jobs))
        start, abandoned = time.perf_counter(), None
        try:
            if client is None and workers == 0:
                if on_start:
                    on_start(summary)
                for job in jobs:
                    if stop is not None and stop.requested:
                        break
                    extract_shard(job, progress)
            else:
                if client is None:
                    from distributed import Client

                    client = stack.enter_context(Client(stack.enter_context(start_cluster(devices))))
                    client.register_plugin(QuietTaskErrors())  # this run reports its tasks' errors
                _run_on_cluster(client, jobs, summary, progress, on_start, stop)
        except (MachineError, DiskFullError) as err:
            raise type(err)(f"{err}\n{_kept(store)}: {AGAIN[type(err)]} to complete them") from err
        except Interrupted as err:  # the grace ran out, or a second signal came: the shards in progress stay pending
            abandoned = err
    summary.seconds = time.perf_counter() - start
    store.write_failures_log()
    if abandoned or (stop is not None and stop.requested and len(store.done_shards()) < store.num_shards):
        signum = abandoned.signum if abandoned else stop.signum
        how = str(abandoned) if abandoned else f"{stop.name}: stopped at a shard boundary"
        raise Interrupted(signum, f"{how}; {_kept(store)}: run the same command again to resume") from None
    status = store.status()
    summary.ok = int((status == OK).sum())
    summary.failed = store.failures()
    return summary


AGAIN = {MachineError: "run the same command again (on a working machine)",
         DiskFullError: "free space there (or move the store to a larger disk), then run the same command again"}


def _check_space(store: FeatureStore, jobs: list[ShardJob]) -> str | None:
    """Refuse (DiskFullError) when the store's filesystem has less room than the features of the
    shards to do take uncompressed; the text of a warning when it has little more. (Object storage
    has no such limit to see.)"""
    if store.path is None:
        return None
    clips = sum(len(job.clips) for job in jobs)
    return check_space(store.path, clips * clip_bytes(store.attrs["features"]),
                       f"the features of the {clips} clips of its {len(jobs)} shards still to extract",
                       "its clips stay pending: free space (or move the store to a larger disk), then run the "
                       "same command again")


def _kept(store: FeatureStore) -> str:
    return (f"{len(store.done_shards())} of {store.num_shards} shards are finished and kept in {store.where}, the "
            "clips of the others stay pending")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_on_cluster(client, jobs: list[ShardJob], summary: ExtractSummary, progress, on_start,
                    stop: StopRequest | None = None) -> None:
    """The shard tasks on the cluster of ``client``. A task that ends with a MachineError is tried
    again, up to RETRIES times, on the workers that have not failed it (any worker once every one
    has); the first error that remains ends the run (the tasks not done are cancelled). Once
    ``stop`` is requested, the tasks not yet begun return at once (``halt``), none is tried again,
    and this returns when the running ones are done."""
    from distributed import Event, as_completed

    summary.dashboard = client.dashboard_link
    if on_start:
        on_start(summary)
    run = _run_name(summary.store)  # keys and events of this store only: other runs may share the scheduler
    halt = Event(f"{run}-halt-{os.getpid()}-{time.time_ns()}", client=client)  # this driver's tasks only

    tries: dict = {}  # future -> (its job, the workers that failed it so far)

    def submit(job: ShardJob, failed_on: tuple[str, ...] = ()):
        others = [w for w in client.scheduler_info()["workers"] if w not in failed_on] if failed_on else None
        key = f"{run}-shard-{job.shard}" + (f"-try{len(failed_on) + 1}" if failed_on else "")
        future = client.submit(_shard_task, job, halt.name, key=key, pure=False, workers=others or None)
        tries[future] = (job, failed_on)
        return future

    if progress:  # workers report each batch as an event (see _report)
        client.subscribe_topic(run, lambda event: progress(*event[1]))
    pending, halted = as_completed([submit(job) for job in jobs]), False
    try:
        while not pending.is_empty():
            if stop is not None and stop.requested and not halted:
                halt.set()
                halted = True
            for future in pending.next_batch(block=False) or _pause():
                job, failed_on = tries[future]
                try:
                    future.result()  # raises the first task error (e.g. --strict) as soon as it comes
                except MachineError as err:
                    failed_on = (*failed_on, err.worker or "")
                    if len(failed_on) > RETRIES:
                        raise MachineError(f"{err} (tried {len(failed_on)} times, on {', '.join(failed_on)})") from err
                    if not halted:  # stopping: its clips stay pending
                        pending.add(submit(job, failed_on))
    finally:
        client.cancel(list(tries))
        if halted:
            halt.clear()  # frees it on the scheduler
        if progress:
            client.unsubscribe_topic(run)


def _pause() -> list:
    """No task ended: wait a little before looking again (and at the stop request)."""
    time.sleep(0.05)
    return []


def _shard_task(job: ShardJob, halt: str) -> dict[str, Any] | None:
    """extract_shard on a dask worker, unless the driver was asked to stop before it began (None)."""
    from distributed import Event

    return None if Event(halt).is_set() else extract_shard(job)


def _run_name(store: str) -> str:
    """The dask name of an extraction into ``store`` (its task keys and progress topic)."""
    return f"xmei-{Location.parse(store).name}-{_sha(store)[:8]}"


def _clip_files(record: Record, media_root: Path) -> tuple[str, str, str]:
    audio = record.audio_file(media_root)
    return record.video_id, str(record.video_file(media_root)), str(audio) if audio else ""


# --------------------------------------------------------------------------- store creation

def _open_or_create(cfg, out: str, records: list[Record], settings: EncoderSettings, split: str,
                    annotations: Path) -> FeatureStore:
    fingerprint = {
        "clips": _sha([[getattr(r, f) for f in FIELDS] for r in records]),
        # names and config hashes, not folders: moving the checkpoints does not change them
        "encoders": _sha({k: {kk: vv for kk, vv in v.items() if kk != "path"}
                          for k, v in encoder_identity(settings, str(cfg.model.caption_tokenizer_path)).items()}),
        "labels": _sha([cfg.emotions.labels, cfg.intents.labels]),
    }
    if store_exists(out):
        store = FeatureStore(out, mode="r+")
        differs = [f"other {k} than this run's" for k, v in fingerprint.items()
                   if store.attrs.get("fingerprint", {}).get(k) != v]
        made, now = store.attrs.get("extract", {}), _stored_settings(cfg)
        differs += [f"extract.{k} {made.get(k)!r}, this run {v!r}" for k, v in now.items() if made.get(k) != v]
        differs += _other_dtype(out, store.attrs.get("compute_dtype"), settings.compute_dtype)
        if differs:
            raise StoreError(f"{out} cannot be resumed by this run, it was made with {'; '.join(differs)}; "
                             "choose another --out (or delete it to start over)")
        return store
    ids = [r.video_id for r in records]
    captions = {kind: [getattr(r, f"{kind}_description") for r in records] for kind in ("video", "audio")}
    ints = {
        **tokenize_captions(str(cfg.model.caption_tokenizer_path), captions, cfg.extract.caption_tokens),
        "emotion_label": np.array([cfg.emotions.index(r.emotion) if r.emotion else -1 for r in records]),
        "intent_label": np.array([cfg.intents.index(r.intent) if r.intent else -1 for r in records]),
    }
    attrs = {
        "split": split,
        "annotations": str(Path(annotations).resolve()),
        "encoders": encoder_identity(settings, str(cfg.model.caption_tokenizer_path)),
        "preprocess": asdict(preparation(settings)),  # what the decode processes do, from the processors
        "extract": cfg.extract.model_dump(),
        "compute_dtype": settings.compute_dtype,  # what extract.precision gave: the encoders' dtype on every worker
        "labels": {"emotions": list(cfg.emotions.labels), "intents": list(cfg.intents.labels)},
        "fingerprint": fingerprint,
        "created_by": "xmei extract",
    }
    if len(set(ids)) != len(ids):
        raise StoreError("duplicate video_id in the annotations")
    texts = {f: [getattr(r, f) for r in records] for f in FIELDS}
    return create_store(out, len(records), cfg.extract.shard_size, feature_specs(settings), texts, ints, attrs,
                        compression=cfg.extract.compression)


# how a run goes, not what it stores: a rerun may change them (a smaller batch after running out of memory)
RUN_ONLY = ("batch_size", "device", "workers_per_gpu", "decode_workers", "allow_absolute_paths")
# compared as what it resolves to: auto here and bf16 there are the same when both give bfloat16
RESOLVED = ("precision",)


def _stored_settings(cfg) -> dict[str, Any]:
    """The extract settings that decide the stored values and layout (all but RUN_ONLY and
    RESOLVED), as JSON gives them back from the store's attributes."""
    settings = {k: v for k, v in cfg.extract.model_dump().items() if k not in RUN_ONLY + RESOLVED}
    return json.loads(json.dumps(settings, default=str))


def _other_dtype(out: str, made: str | None, now: str) -> list[str]:
    """[why the store ``out``, computed in ``made``, cannot be resumed in ``now``], or []. A store
    made before the dtype was recorded resumes, with an ExtractWarning."""
    if made is None:
        warnings.warn(f"{out} does not record the encoders' compute dtype (made by an earlier xmei): resuming it in "
                      f"{now}, which its finished shards may not have been computed in", ExtractWarning, stacklevel=3)
        return []
    if made == now:
        return []
    precision = next(k for k, v in PRECISIONS.items() if v == made)
    return [f"encoders computing in {made}, this run in {now} (resume it with extract.precision={precision} "
            "on workers that compute in it)"]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the worker side

_ENCODERS: dict[str, Encoders] = {}  # per process: a worker loads its encoders once


def _encoders(settings: EncoderSettings) -> Encoders:
    if settings.key() not in _ENCODERS:
        _ENCODERS[settings.key()] = Encoders(settings)
    return _ENCODERS[settings.key()]


_POOLS: dict[int, DecodePool] = {}  # per process: decode processes started once, kept across shards


def _pool(job: ShardJob) -> DecodePool:
    """This worker's decode processes: extract.decode_workers, else its share of its node's cores
    (a worker on a host the driver did not know at the start takes every core it may use)."""
    processes = job.settings.decode_workers or job.decode_processes.get(socket.gethostname()) or available_cores()
    if processes not in _POOLS:
        _POOLS[processes] = DecodePool(processes)
    return _POOLS[processes]


def _report(job: ShardJob, progress: Callable[[int, int], None] | None, clips: int, failed: int) -> None:
    """Tell the driver that ``clips`` more clips are done, ``failed`` of them failed: directly in
    this process, or as a dask event of the job's store when running on a worker."""
    if progress is not None:
        progress(clips, failed)
        return
    from distributed import get_worker

    try:
        get_worker().log_event(_run_name(job.store), (clips, failed))
    except ValueError:  # not on a dask worker, nobody is listening
        pass


def _machine_error(job: ShardJob, err: BaseException) -> MachineError:
    """``err`` is the machine's, not a clip's: this process's encoders are dropped (the next task
    here loads them anew) and the error names the worker."""
    _ENCODERS.pop(job.settings.key(), None)
    from distributed import get_worker

    try:
        address = get_worker().address
    except ValueError:  # not on a dask worker
        address = None
    worker = f"worker {address} on {socket.gethostname()}" if address else f"this process on {socket.gethostname()}"
    error = MachineError(f"{worker} failed on shard {job.shard} of {job.store}: {_reason(err)}; nothing of the shard "
                         "was written and its clips stay pending (not failed: the fault is the machine's)")
    error.worker = address  # kept through pickling (an exception's __dict__ travels with it)
    return error


def extract_shard(job: ShardJob, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Extract and write one whole shard; returns {"shard", "ok", "failed", "seconds"}.
    ``progress(clips, failed)`` is called after each batch (on a dask worker: an event). An error
    of the machine (see machine_fault) raises a MachineError before anything is written."""
    start = time.perf_counter()
    use_endpoint(job.endpoint_url)
    try:
        encoders = _encoders(job.settings)
    except Exception as err:
        if machine_fault(err):
            raise _machine_error(job, err) from err
        raise
    store = FeatureStore(job.store, mode="r+")
    specs = {name: (tuple(v["shape"]), v["dtype"]) for name, v in store.attrs["features"].items()}
    n = len(job.clips)
    arrays = {name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in specs.items()}
    status = np.full(n, OK, np.uint8)
    failures: list[dict[str, str]] = []
    batch: list[tuple[int, Prepared]] = []

    def fail(i: int, stage: str, reason: str) -> None:
        """Clip i failed: its rows stay zero (never stored as data), its reason is kept."""
        video_id = job.clips[i][0]
        if job.strict:
            raise ExtractionError(f"clip {video_id!r} failed ({stage}): {reason}")
        for values in arrays.values():
            values[i] = 0
        status[i] = FAILED
        failures.append({"video_id": video_id, "stage": stage, "reason": reason})
        _report(job, progress, 1, 1)

    def encode(items: list[tuple[int, Prepared]]) -> None:
        rows = [i for i, _ in items]
        for name, values in encoders.encode([p for _, p in items]).items():
            arrays[name][rows] = values
        _report(job, progress, len(items), 0)

    def encode_alone(item: tuple[int, Prepared]) -> None:
        """One clip: an error of its own fails it; an error of the machine ends the task."""
        try:
            encode([item])
        except Exception as err:  # noqa: BLE001 - one clip's error must not end the shard
            if machine_fault(err):
                raise _machine_error(job, err) from err
            fail(item[0], "encode", _reason(err))

    def flush() -> None:
        """Encode the batch; when it fails (a bad clip, or out of memory), clip by clip, so that
        only a bad clip fails. Any other error of the machine ends the task at once."""
        if len(batch) == 1:
            encode_alone(batch[0])
        elif batch:
            try:
                encode(batch)
            except Exception as err:  # noqa: BLE001
                if machine_fault(err) == "device":  # e.g. an illegal memory access: no clip would fare better
                    raise _machine_error(job, err) from err
                for item in batch:
                    encode_alone(item)
        batch.clear()

    # the decode processes work ahead of the encoders by AHEAD_BATCHES batches (bounds memory),
    # and at least one clip per process so that none idles
    pool = _pool(job)
    ahead = max(AHEAD_BATCHES * job.settings.batch_size, pool.processes)
    prepared = pool.map((Clip(video, audio, encoders.preparation) for _, video, audio in job.clips), ahead)
    try:
        for i, result in prepared:
            if isinstance(result, Failure):
                fail(i, result.stage, result.reason)
            else:
                batch.append((i, result))
            if len(batch) == job.settings.batch_size:
                flush()
        flush()
    finally:
        prepared.close()  # --strict or a machine error: stop now, not after the clips decoding ahead
    store.write_shard(job.shard, arrays, status, failures)
    return {"shard": job.shard, "ok": int((status == OK).sum()), "failed": failures,
            "seconds": time.perf_counter() - start}


def _reason(err: BaseException) -> str:
    """An unexpected error as a failure reason: its type and message."""
    return f"{type(err).__name__}: {err}"
