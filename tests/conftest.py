"""Shared fixtures: real files at small scale, each built once per test session.

They are handed out to every test that asks, so a test only reads them: one that damages, extends
or resumes an artefact works on its own copy (``shutil.copytree`` into its ``tmp_path``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xmei.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
# a brief run of the tiny model: one epoch of the 24 clips in 6 steps of 4, a checkpoint every 3
TRAIN = ("run.batch_size_train=4", "run.batch_size_eval=8", "run.num_workers=0", "run.warmup_steps=2",
         "run.init_lr=2e-3", "run.min_lr=1e-4", "run.warmup_lr=1e-5", "run.max_epoch=1", "eval.max_new_tokens=48")
KEEP_EVERY_3 = ("run.save_every_steps=3", "run.keep_checkpoints=10")
LAST, EARLIER = "checkpoints/step_0000006", "checkpoints/step_0000003"


def config(tiny_models: Path, *sets: str):
    """The tiny config on the tiny models, in shards of 8 clips."""
    return load_config(ROOT / "configs" / "tiny.yaml", ["extract.shard_size=8", "extract.batch_size=4", *sets],
                       models_dir=tiny_models)


def debian_program(program: str, package: str) -> str:
    """The path of ``program``; Debian's ``package`` is installed when it is missing (as root), as
    the browser tests need chromium and chromedriver."""
    import os
    import shutil
    import subprocess

    if shutil.which(program) is None:
        if os.geteuid() != 0:
            pytest.fail(f"this test needs {program}: apt-get install {package} (as root)")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
        if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, check=True)
            subprocess.run(install, capture_output=True, timeout=900, check=True)
    return shutil.which(program)


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible HTTP server on 127.0.0.1 (moto's ThreadedMotoServer) with a bucket "xmei",
    and fake credentials and the endpoint in the environment for the session (the processes tests
    start inherit them): (endpoint URL, bucket)."""
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    fake = {"AWS_ACCESS_KEY_ID": "xmei-test", "AWS_SECRET_ACCESS_KEY": "xmei-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
            "AWS_ALLOW_HTTP": "true"}
    before = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="xmei")
    yield url, "xmei"
    server.stop()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


@pytest.fixture(scope="session")
def pooled_store(tiny_models, corpus, annotations, tmp_path_factory) -> Path:
    """The corpus extracted with pooled visual features (24, 8, 32): a store of other features than
    the patch store's (and its checkpoints')."""
    from pipeline.extract import extract

    out = tmp_path_factory.mktemp("stores") / "pooled"
    extract(config(tiny_models, "extract.visual_tokens=pooled"), annotations, corpus, out, workers=0)
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


def train_run(tiny_models: Path, store: Path, out: Path, *sets: str) -> Path:
    """``out`` after a brief run (TRAIN, then ``sets``) on ``store``."""
    from xmei.train import Trainer

    trainer = Trainer(config(tiny_models, *TRAIN, *sets), [store], None, out)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_models, patch_store, tmp_path_factory) -> Path:
    """A brief run on the patch store with its checkpoints step_0000003 (EARLIER) and step_0000006
    (LAST): the trained checkpoint of the eval, predict, attention and fault tests."""
    return train_run(tiny_models, patch_store, tmp_path_factory.mktemp("trained") / "run", *KEEP_EVERY_3)


@pytest.fixture(scope="session")
def untrained(tiny_models, patch_store, tmp_path_factory) -> Path:
    """A checkpoint saved before any step, whose answers differ between clips (some end early)."""
    import torch

    from xmei.train import Trainer

    trainer = Trainer(config(tiny_models, *TRAIN), [patch_store], None, tmp_path_factory.mktemp("untrained"))
    trainer.setup()
    # PyTorch's default init instead of BLIP-2's N(0, 0.02): untrained modality tokens then differ
    # enough between clips for these tests' answers to differ (and some to end early)
    for module in trainer.model.trainable_modules().values():
        for part in module.modules():
            if isinstance(part, (torch.nn.Linear, torch.nn.Embedding)):
                part.reset_parameters()
    eos = trainer.model.tokenizer.eos_token_id
    with torch.no_grad():  # and an end-of-turn a random LLM rarely picks made likelier: some answers end early
        for name, weight in trainer.model.llm.named_parameters():
            if name.endswith("lm_head.modules_to_save.default.weight"):
                weight[eos] *= 6
    folder = trainer.save_checkpoint()
    trainer.cleanup()
    return folder
