"""What a store holds (`xmei stores info`) and whether it is sound (`xmei stores verify`)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from stores.store import FAILED, OK, PENDING, STATUS_NAMES, FeatureStore, StoreError

__all__ = ["store_info", "verify_store"]


def store_info(store: FeatureStore) -> dict[str, Any]:
    status = Counter(STATUS_NAMES[int(s)] for s in store.status())
    sizes, arrays = store.files.sizes(), {}  # every file (object) of the store: its bytes
    for name in [*store.features, "status", *store.texts, *store.ints]:
        array = store.array(name)
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                        "bytes": sum(size for key, size in sizes.items() if key.startswith(f"{name}/"))}
    return {
        "path": store.where, "split": store.attrs.get("split"), "clips": len(store),
        "shards": store.num_shards, "shard_size": store.shard_size,
        "status": {name: status.get(name, 0) for name in STATUS_NAMES.values()},
        "bytes": sum(sizes.values()), "arrays": arrays,
        "encoders": store.attrs.get("encoders"), "compute_dtype": store.attrs.get("compute_dtype"),
        "extract": store.attrs.get("extract"),
        "labels": store.attrs.get("labels"), "failures": len(store.failures()),
    }


def verify_store(store: FeatureStore) -> list[str]:
    """Every problem found, each naming the array (and file, shard, clips) or clip; empty when the
    store is sound. Every chunk of every array is read: a damaged one is a problem, and the rest
    are read on."""
    problems = store.shape_problems()
    if problems:
        return problems  # the per-clip checks below assume every array opens with the right shape
    damaged = store.file_problems()  # (array, shard) -> problem: not read again below
    problems += damaged.values()
    n = len(store)
    names = [*store.features, "status", *store.texts, *store.ints]
    status = np.zeros(n, np.uint8)
    status_read = True  # every status shard read
    failed_ids: set[str] = set()
    for shard in range(store.num_shards):
        rows = store.shard_range(shard)
        data = {}
        for name in names:
            if (name, shard) in damaged:
                continue
            try:
                data[name] = store._read(name, slice(rows.start, rows.stop))
            except StoreError as err:
                problems.append(str(err))
        if "status" in data:
            status[rows.start:rows.stop] = data["status"]
        else:
            status_read = False
        problems += _clip_problems(shard, rows, data, failed_ids)
    pending = int((status == PENDING).sum())
    if pending and status_read:
        problems.append(f"status: {pending} clip(s) still pending (an unfinished run: rerun xmei extract)")
    if not status_read:
        return problems  # which clips failed is not known: the failures log cannot be compared
    try:
        logged = {row["video_id"] for row in store.failures()}
    except StoreError as err:
        problems.append(str(err))
        return problems
    if logged != failed_ids:
        problems.append(f"failures log: lists {sorted(logged - failed_ids)} not failed in status, "
                        f"misses {sorted(failed_ids - logged)}")
    try:
        log = {row["video_id"] for row in store.logged_failures()}
        if store.files.exists("failures.jsonl") and not pending and log != logged:
            problems.append(f"{store.files.name('failures.jsonl')}: lists {sorted(log - logged)} not in failures/, "
                            f"misses {sorted(logged - log)}: rerun xmei extract to rewrite it")
    except StoreError as err:
        problems.append(str(err))
    ok = int((status == OK).sum())
    if ok + len(failed_ids) + pending != n:
        problems.append(f"status: {ok} ok + {len(failed_ids)} failed + {pending} pending != {n} clips")
    return problems


def _clip_problems(shard: int, rows: range, data: dict[str, np.ndarray], failed_ids: set[str]) -> list[str]:
    """The per-clip checks of one shard, on the arrays that could be read (``data``); adds the
    shard's failed clips to ``failed_ids``."""
    problems: list[str] = []
    if "status" not in data:
        return problems
    features = [k for k in ("visual", "audio") if k in data]
    for j, i in enumerate(rows):
        video_id = str(data["video_id"][j]) if "video_id" in data else f"clip {i}"
        clip = f"clip {i} ({video_id!r})"
        state = int(data["status"][j])
        if state not in STATUS_NAMES:
            problems.append(f"status: {clip} has unknown status {state}")
            continue
        feats = {k: data[k][j] for k in features}
        for key, values in feats.items():
            if not np.isfinite(values.astype(np.float32)).all():
                problems.append(f"{key}: {clip} holds NaN or Inf")
        has_audio = int(data["has_audio"][j]) if "has_audio" in data else None
        if state in (PENDING, FAILED):
            if any(np.any(v) for v in feats.values()) or has_audio:
                problems.append(f"status: {clip} is {STATUS_NAMES[state]} but holds feature data")
            if state == FAILED:
                failed_ids.add(video_id)
            continue
        if "visual" in feats and not np.any(feats["visual"]):
            problems.append(f"visual: {clip} is ok but its features are all zero")
        if has_audio is None or "audio_lengths" not in data:
            continue
        lengths = data["audio_lengths"][j]
        # not the features: silent audio is valid and its features may be exactly zero
        if has_audio == 1 and not (lengths > 0).all():
            problems.append(f"audio: {clip} has audio but zero window lengths")
        if has_audio == 0 and (np.any(feats.get("audio", 0)) or np.any(lengths)):
            problems.append(f"audio: {clip} is flagged without audio but holds audio features")
        if has_audio not in (0, 1):
            problems.append(f"has_audio: {clip} is {has_audio}, expected 0 or 1")
    for kind in ("video", "audio"):
        mask = data.get(f"{kind}_caption_mask")
        if mask is not None and not np.isin(mask, (0, 1)).all():
            problems.append(f"{kind}_caption_mask: shard {shard} holds values other than 0/1")
    return problems
