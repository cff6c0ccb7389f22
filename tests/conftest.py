"""Shared fixtures: real files at small scale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xmei.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def config(tiny_models: Path, *sets: str):
    """The tiny config on the tiny models, in shards of 8 clips."""
    return load_config(ROOT / "configs" / "tiny.yaml", ["extract.shard_size=8", "extract.batch_size=4", *sets],
                       models_dir=tiny_models)


@pytest.fixture(scope="session")
def cfg() -> Config:
    return Config()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, cfg):
    """A small synthetic corpus on disk (24 clips, seed 3)."""
    from pipeline.synth import synth_corpus

    out = tmp_path_factory.mktemp("corpus")
    synth_corpus(out, 24, 3, cfg.emotions, cfg.intents, workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny model set, built once per test session."""
    from pipeline.tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("models")
    build_tiny_models(out, seed=0)
    return out


@pytest.fixture(scope="session")
def annotations(corpus, tmp_path_factory) -> Path:
    """Every record of the corpus in one file (train + val + test), in video_id order."""
    rows = [r for s in ("train", "val", "test") for r in json.loads((corpus / "annotations" / f"{s}.json").read_text())]
    rows.sort(key=lambda r: r["video_id"])
    path = tmp_path_factory.mktemp("ann") / "all.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="session")
def patch_store(tiny_models, corpus, annotations, tmp_path_factory) -> Path:
    """The corpus extracted with patch features: 24 clips in 3 shards of 8."""
    from pipeline.extract import extract

    out = tmp_path_factory.mktemp("stores") / "patch"
    extract(config(tiny_models), annotations, corpus, out, workers=0)
    return out


def store_in_dtype(source: Path, out: Path, dtype: str | None) -> Path:
    """A copy of the store ``source`` whose attributes say its encoders computed in ``dtype``
    (None: no record, as made by an earlier xmei)."""
    import shutil

    shutil.copytree(source, out)
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"].pop("compute_dtype", None)
    if dtype:
        meta["attributes"]["compute_dtype"] = dtype
    (out / "zarr.json").write_text(json.dumps(meta))
    return out
