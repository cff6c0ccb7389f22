"""Stage 1 driver: annotations + media -> a feature store, shard by shard, on a dask cluster.

A task extracts and writes one whole shard, so no two workers ever write the same files and
no lock is needed. A worker loads the encoders and starts its decode processes once and keeps
them (pipeline.decode_pool). Within a task, the decode processes prepare clips a bounded number
ahead while the encoders work on the previous batch. A rerun skips finished shards; a clip whose
media are missing or corrupt, or whose decoder crashes, is marked failed with its reason, never
replaced.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.annotations import FIELDS, Record, read_annotations
from pipeline.decode_pool import Clip, DecodePool, Failure, Prepared, available_cores
from pipeline.encoders import (EncoderSettings, Encoders, encoder_identity, feature_specs, preparation,
                               tokenize_captions)
from pipeline.farm import check_farm, start_cluster, worker_devices, worker_gpu_info
from stores import FAILED, OK, FeatureStore, StoreError, create_store
from xmei.errors import UserError

__all__ = ["ExtractionError", "ExtractSummary", "extract", "extract_shard"]

PROGRESS_TOPIC = "xmei-extract-progress"
MODEL_KEYS = ("model.visual_encoder_path", "model.acoustic_encoder_path", "model.caption_tokenizer_path")
AHEAD_BATCHES = 2


class ExtractionError(UserError, RuntimeError):
    """A clip failed under --strict."""


@dataclass(frozen=True)
class ShardJob:
    store: str
    shard: int
    clips: list[tuple[str, str, str]]  # (video_id, video file, audio file or "" for the video's track)
    settings: EncoderSettings
    strict: bool


@dataclass
class ExtractSummary:
    store: Path
    clips: int
    shards: int
    shards_skipped: int  # finished by an earlier run
    ok: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str | None = None


def extract(cfg, annotations: Path, media_root: Path, out: Path, split: str | None = None,
            scheduler: str | None = None, workers: int | None = None, strict: bool = False, unlabeled: bool = False,
            progress: Callable[[int, int], None] | None = None,
            on_start: Callable[[ExtractSummary], None] | None = None) -> ExtractSummary:
    """Extract every clip of ``annotations`` into the store ``out`` (created, or resumed).

    ``workers`` = 0 runs in this process without dask; otherwise a LocalCluster on 127.0.0.1 of
    that many workers (None: one per GPU slot, see pipeline.farm; 1 on a CPU machine), each
    pinned to its own GPU, unless ``scheduler`` names an existing cluster (whose workers must
    each declare their GPU). Local workers share the cores for decoding unless
    extract.decode_workers says how many each one starts.
    ``progress(clips, failed)`` is called after each encoder batch and each failed clip;
    ``on_start(summary)`` once the work is known (and the dashboard address, on a cluster).
    """
    cfg.require_paths(MODEL_KEYS)
    # workers of a farm need absolute paths (their working folder is not ours)
    out, media_root = Path(out).resolve(), Path(media_root).resolve()
    records = read_annotations(annotations, cfg.emotions, cfg.intents, media_root=None, labeled=not unlabeled,
                               allow_absolute=cfg.extract.allow_absolute_paths)
    settings = EncoderSettings.from_config(cfg)
    devices, x = None, cfg.extract
    if scheduler is None:  # a GPU this machine lacks is one error here, not one in every worker
        devices = worker_devices(x.device, 1 if workers == 0 else workers, x.workers_per_gpu, _gpu_count())
        if workers != 0 and not x.decode_workers:  # the cores of this machine, dealt among its workers
            settings = replace(settings, decode_workers=max(1, available_cores() // len(devices)))
    store = _open_or_create(cfg, out, records, settings, split or Path(annotations).stem, annotations)
    done = store.done_shards()
    jobs = [ShardJob(str(out), k, [_clip_files(records[i], media_root) for i in store.shard_range(k)], settings, strict)
            for k in range(store.num_shards) if k not in done]
    summary = ExtractSummary(out, len(records), store.num_shards, len(done))
    start = time.perf_counter()
    if workers == 0 and scheduler is None:
        if on_start:
            on_start(summary)
        for job in jobs:
            extract_shard(job, progress)
    else:
        _run_on_cluster(jobs, summary, scheduler, devices, cfg, progress, on_start)
    summary.seconds = time.perf_counter() - start
    store.write_failures_log()
    status = store.status()
    summary.ok = int((status == OK).sum())
    summary.failed = store.failures()
    return summary


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_on_cluster(jobs: list[ShardJob], summary: ExtractSummary, scheduler: str | None, devices: list[str] | None,
                    cfg, progress, on_start) -> None:
    """The shard tasks on a LocalCluster of one worker per device, or on the farm at ``scheduler``."""
    from distributed import Client, as_completed

    cluster = start_cluster(devices) if scheduler is None else None
    try:
        with Client(scheduler or cluster) as client:
            if scheduler is not None:  # never two workers on one GPU unless asked
                check_farm(client.run(worker_gpu_info), cfg.extract.device, cfg.extract.workers_per_gpu)
            summary.dashboard = client.dashboard_link
            if on_start:
                on_start(summary)
            if progress:  # workers report each batch as an event (see _report)
                client.subscribe_topic(PROGRESS_TOPIC, lambda event: progress(*event[1]))
            futures = [client.submit(extract_shard, job, key=f"xmei-shard-{job.shard}", pure=False) for job in jobs]
            try:
                for future in as_completed(futures):
                    future.result()  # raises the first task error (e.g. --strict) as soon as it comes
            finally:
                client.cancel(futures)
    finally:
        if cluster is not None:
            cluster.close()


def _clip_files(record: Record, media_root: Path) -> tuple[str, str, str]:
    audio = record.audio_file(media_root)
    return record.video_id, str(record.video_file(media_root)), str(audio) if audio else ""


# --------------------------------------------------------------------------- store creation

def _open_or_create(cfg, out: Path, records: list[Record], settings: EncoderSettings, split: str,
                    annotations: Path) -> FeatureStore:
    fingerprint = {
        "clips": _sha([[getattr(r, f) for f in FIELDS] for r in records]),
        # names and config hashes, not folders: moving the checkpoints does not change them
        "encoders": _sha({k: {kk: vv for kk, vv in v.items() if kk != "path"}
                          for k, v in encoder_identity(settings, str(cfg.model.caption_tokenizer_path)).items()}),
        "labels": _sha([cfg.emotions.labels, cfg.intents.labels]),
    }
    if out.exists():
        store = FeatureStore(out, mode="r+")
        differs = [f"other {k} than this run's" for k, v in fingerprint.items()
                   if store.attrs.get("fingerprint", {}).get(k) != v]
        made, now = store.attrs.get("extract", {}), _stored_settings(cfg)
        differs += [f"extract.{k} {made.get(k)!r}, this run {v!r}" for k, v in now.items() if made.get(k) != v]
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


def _stored_settings(cfg) -> dict[str, Any]:
    """The extract settings that decide the stored values and layout (all but RUN_ONLY), as JSON
    gives them back from the store's attributes."""
    settings = {k: v for k, v in cfg.extract.model_dump().items() if k not in RUN_ONLY}
    return json.loads(json.dumps(settings, default=str))


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the worker side

_ENCODERS: dict[str, Encoders] = {}  # per process: a worker loads its encoders once


def _encoders(settings: EncoderSettings) -> Encoders:
    if settings.key() not in _ENCODERS:
        _ENCODERS[settings.key()] = Encoders(settings)
    return _ENCODERS[settings.key()]


_POOLS: dict[int, DecodePool] = {}  # per process: decode processes started once, kept across shards


def _pool(settings: EncoderSettings) -> DecodePool:
    processes = settings.decode_workers or available_cores()
    if processes not in _POOLS:
        _POOLS[processes] = DecodePool(processes)
    return _POOLS[processes]


def _report(progress: Callable[[int, int], None] | None, clips: int, failed: int) -> None:
    """Tell the driver that ``clips`` more clips are done, ``failed`` of them failed: directly in
    this process, or as a dask event when running on a worker."""
    if progress is not None:
        progress(clips, failed)
        return
    from distributed import get_worker

    try:
        get_worker().log_event(PROGRESS_TOPIC, (clips, failed))
    except ValueError:  # not on a dask worker, nobody is listening
        pass


def extract_shard(job: ShardJob, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Extract and write one whole shard; returns {"shard", "ok", "failed", "seconds"}.
    ``progress(clips, failed)`` is called after each batch (on a dask worker: an event)."""
    start = time.perf_counter()
    encoders = _encoders(job.settings)
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
        _report(progress, 1, 1)

    def encode(items: list[tuple[int, Prepared]]) -> None:
        rows = [i for i, _ in items]
        for name, values in encoders.encode([p for _, p in items]).items():
            arrays[name][rows] = values

    def flush() -> None:
        """Encode the batch; when it fails, clip by clip, so that only a bad clip fails."""
        if not batch:
            return
        try:
            encode(batch)
            _report(progress, len(batch), 0)
        except Exception as err:  # noqa: BLE001 - one clip's error must not end the shard
            if len(batch) == 1:
                fail(batch[0][0], "encode", _reason(err))
            else:
                for item in batch:
                    try:
                        encode([item])
                        _report(progress, 1, 0)
                    except Exception as one:  # noqa: BLE001
                        fail(item[0], "encode", _reason(one))
        batch.clear()

    # the decode processes work ahead of the encoders by AHEAD_BATCHES batches (bounds memory),
    # and at least one clip per process so that none idles
    pool = _pool(job.settings)
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
        prepared.close()  # --strict: stop now, not after the clips decoding ahead
    store.write_shard(job.shard, arrays, status, failures)
    return {"shard": job.shard, "ok": int((status == OK).sum()), "failed": failures,
            "seconds": time.perf_counter() - start}


def _reason(err: BaseException) -> str:
    """An unexpected error as a failure reason: its type and message."""
    return f"{type(err).__name__}: {err}"
