"""Shared fixtures: real files at small scale."""
from __future__ import annotations

import pytest

from xmei.config import Config


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
