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
