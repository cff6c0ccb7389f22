"""What a store holds (`xmei stores info`) and whether it is sound (`xmei stores verify`)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stores.store import FAILED, OK, PENDING, STATUS_NAMES, FeatureStore

__all__ = ["store_info", "verify_store"]


def _bytes_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def store_info(store: FeatureStore) -> dict[str, Any]:
    status = Counter(STATUS_NAMES[int(s)] for s in store.status())
    arrays = {}
    for name in [*store.features, "status", *store.texts, *store.ints]:
        array = store.array(name)
        arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                        "bytes": _bytes_on_disk(store.path / name)}
    return {
        "path": str(store.path), "split": store.attrs.get("split"), "clips": len(store),
        "shards": store.num_shards, "shard_size": store.shard_size,
        "status": {name: status.get(name, 0) for name in STATUS_NAMES.values()},
        "bytes": _bytes_on_disk(store.path), "arrays": arrays,
        "encoders": store.attrs.get("encoders"), "extract": store.attrs.get("extract"),
        "labels": store.attrs.get("labels"), "failures": len(store.failures()),
    }


def verify_store(store: FeatureStore) -> list[str]:
    """Every problem found, each naming the array and clip; empty when the store is sound."""
    problems: list[str] = []
    n = len(store)
    for name, spec in store.attrs["features"].items():
        array = store.array(name)
        if tuple(array.shape) != (n, *spec["shape"]) or str(array.dtype) != spec["dtype"]:
            problems.append(f"{name}: shape {tuple(array.shape)} dtype {array.dtype}, "
                            f"attributes say {(n, *spec['shape'])} {spec['dtype']}")
    for name in [*store.texts, *store.ints, "status"]:
        if store.array(name).shape[0] != n:
            problems.append(f"{name}: {store.array(name).shape[0]} rows for {n} clips")
    if problems:
        return problems  # the per-clip checks below assume the shapes are right

    failed_ids = set()
    for shard, data in store.iter_shards():
        rows = store.shard_range(shard)
        for j, i in enumerate(rows):
            clip = f"clip {i} ({data['video_id'][j]!r})"
            state = int(data["status"][j])
            if state not in STATUS_NAMES:
                problems.append(f"status: {clip} has unknown status {state}")
                continue
            feats = {k: data[k][j] for k in ("visual", "audio")}
            for key, values in feats.items():
                if not np.isfinite(values.astype(np.float32)).all():
                    problems.append(f"{key}: {clip} holds NaN or Inf")
            if state in (PENDING, FAILED):
                if any(np.any(v) for v in feats.values()) or data["has_audio"][j]:
                    problems.append(f"status: {clip} is {STATUS_NAMES[state]} but holds feature data")
                if state == FAILED:
                    failed_ids.add(str(data["video_id"][j]))
                continue
            if not np.any(feats["visual"]):
                problems.append(f"visual: {clip} is ok but its features are all zero")
            has_audio, lengths = int(data["has_audio"][j]), data["audio_lengths"][j]
            # not the features: silent audio is valid and its features may be exactly zero
            if has_audio == 1 and not (lengths > 0).all():
                problems.append(f"audio: {clip} has audio but zero window lengths")
            if has_audio == 0 and (np.any(feats["audio"]) or np.any(lengths)):
                problems.append(f"audio: {clip} is flagged without audio but holds audio features")
            if has_audio not in (0, 1):
                problems.append(f"has_audio: {clip} is {has_audio}, expected 0 or 1")
        for kind in ("video", "audio"):
            mask = data[f"{kind}_caption_mask"]
            if not np.isin(mask, (0, 1)).all():
                problems.append(f"{kind}_caption_mask: shard {shard} holds values other than 0/1")
    pending = int((store.status() == PENDING).sum())
    if pending:
        problems.append(f"status: {pending} clip(s) still pending (an unfinished run: rerun xmei extract)")
    logged = {row["video_id"] for row in store.failures()}
    if logged != failed_ids:
        problems.append(f"failures log: lists {sorted(logged - failed_ids)} not failed in status, "
                        f"misses {sorted(failed_ids - logged)}")
    ok = int((store.status() == OK).sum())
    if ok + len(failed_ids) + pending != n:
        problems.append(f"status: {ok} ok + {len(failed_ids)} failed + {pending} pending != {n} clips")
    return problems
