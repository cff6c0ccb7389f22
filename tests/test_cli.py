"""The `xmei` command as a user runs it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_only_working_commands_are_registered():
    import typer.main

    group = typer.main.get_command(app)
    assert set(group.commands) == {"config", "synth", "validate", "annotate", "models", "extract", "stores", "train",
                                   "eval", "score", "report", "predict", "attention", "serve", "demo"}
    assert set(group.commands["models"].commands) == {"tiny"}
    assert set(group.commands["stores"].commands) == {"info", "verify", "export", "import", "copy"}
    result = run("models", "--help")
    assert result.exit_code == 0 and "tiny" in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "xmei"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "validate" in result.stdout


def test_validate_accepts_the_synthetic_corpus(corpus):
    result = run("validate", corpus / "annotations" / "train.json")  # media root from the published layout
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "ok" in text and f"media root {corpus}" in text and "emotion ┃ clips" in text


def test_validate_lists_every_problem_of_a_corrupted_copy(corpus, tmp_path):
    rows = json.loads((corpus / "annotations" / "train.json").read_text())
    rows[0]["emotion"] = "ecstatic"                 # unknown label
    del rows[1]["explanation"]                      # missing field
    rows[2]["video_id"] = rows[3]["video_id"]       # duplicate id
    rows[4]["video_path"] = "videos/nowhere.mp4"    # missing media
    rows[5]["subtitle"] = 42                        # wrong type
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    result = run("validate", bad, "--media-root", corpus)
    assert result.exit_code == 1
    text = flat(result.stderr)
    assert "5 problem(s)" in text
    assert f"record 0, video_id '{rows[0]['video_id']}', field 'emotion': unknown label 'ecstatic'" in text
    assert f"record 1, video_id '{rows[1]['video_id']}', field 'explanation': missing field" in text
    assert f"record 3, video_id '{rows[3]['video_id']}', field 'video_id': duplicate: record 2" in text
    assert f"record 4, video_id '{rows[4]['video_id']}', field 'video_path': missing media file" in text
    assert f"record 5, video_id '{rows[5]['video_id']}', field 'subtitle': expected a string, got int 42" in text
    assert rows[4]["video_id"] in flat(result.stdout)  # the summary's missing-media list


def test_validate_uses_the_configs_media_root_and_names_it_when_missing(corpus, tmp_path):
    ann = shutil.copy(corpus / "annotations" / "val.json", tmp_path / "val.json")
    result = run("validate", ann, "--set", f"datasets.synth.media_root={corpus}")
    assert result.exit_code == 0, result.output
    result = run("validate", ann, "--set", "datasets.synth.media_root=/no/such/root")
    assert result.exit_code == 2 and "datasets.synth.media_root: /no/such/root does not exist" in flat(result.stderr)


def test_config_command_applies_overrides_and_reports_errors(tmp_path):
    result = run("config", "--config", ROOT / "configs" / "tiny.yaml", "--set", "run.init_lr=2e-4")
    assert result.exit_code == 0 and "init_lr: 0.0002" in result.stdout
    result = run("config", "--config", ROOT / "configs" / "tiny.yaml", "--set", "run.bogus=1")
    assert result.exit_code == 2 and "run.bogus: unknown key" in flat(result.stderr)
    result = run("config", "--config", ROOT / "tests" / "data" / "published_config.yaml")
    assert result.exit_code == 0 and "warning" in result.stderr and "run.task" in result.stderr
    for name in ("config.json", "preprocessor_config.json"):  # a model folder, as far as --check looks
        (tmp_path / name).write_text("{}")
    result = run("config", "--config", ROOT / "configs" / "xmei_qwen.yaml", "--check",
                 "--set", f"model.visual_encoder_path={tmp_path}")
    assert result.exit_code == 1
    assert "model.llama_model_path: checkpoints/Qwen2.5-7B-Instruct does not exist" in flat(result.stderr)
    assert "model.visual_encoder_path" not in result.stderr
    result = run("config", "--config", ROOT / "configs" / "tiny.yaml", "--set", "model.modalities=[smell]")
    assert result.exit_code == 2  # brackets in a message are text, not console markup
    assert "model.modalities: [video, audio], [video] or [audio], got ['smell']" in flat(result.stderr)


def test_synth_then_models_tiny_then_config_check(tmp_path):
    result = run("synth", tmp_path / "data", "--n", "4", "--seed", "2", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "wrote 4 clips" in flat(result.stdout)
    again = run("synth", tmp_path / "data", "--n", "4")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    result = run("models", "tiny", tmp_path / "models")
    assert result.exit_code == 0, result.output
    result = run("config", "--config", ROOT / "configs" / "tiny.yaml", "--models", tmp_path / "models",
                 "--set", f"datasets.xmei_synth.media_root={tmp_path / 'data'}",
                 *[a for split in ("train", "val", "test") for a in
                   ("--set", f"datasets.xmei_synth.annotations.{split}={tmp_path / 'data/annotations' / split}.json")],
                 "--check")
    assert result.exit_code == 0, result.output
    assert "all 9 configured paths exist" in result.stderr  # the four models, Whisper, the media and 3 splits


def test_stores_commands_read_no_config(tmp_path, monkeypatch):
    """The stores commands neither load a config nor offer its options."""
    import cli
    from test_reader import small_store

    small_store(tmp_path / "store")
    monkeypatch.setattr(cli, "load_config", lambda *args, **kwargs: pytest.fail("a stores command loaded a config"))
    assert run("stores", "info", tmp_path / "store").exit_code == 0
    assert run("stores", "export", tmp_path / "store", tmp_path / "out.h5").exit_code == 0
    for command in ("info", "verify", "export", "import", "copy"):
        assert "--config" not in run("stores", command, "--help").output
    refused = run("stores", "info", tmp_path / "store", "--config", tmp_path / "x.yaml")
    assert refused.exit_code == 2 and "No such option" in refused.output


def test_the_in_process_harness_ends_as_the_installed_script(tmp_path, monkeypatch):
    """tests/faults.py's `xmei` runs the command in this process: the same status and stderr as the
    script for a user's mistake, a traceback and status 1 for a bug, and the environment put back."""
    from faults import xmei

    missing = tmp_path / "nowhere.json"
    before = dict(os.environ)
    inside, script = xmei("validate", missing, env={"XMEI_TEST_MARK": "1"}), xmei("validate", missing, process=True)
    assert (inside.returncode, inside.stderr, inside.stdout) == (script.returncode, script.stderr, script.stdout)
    assert inside.returncode == 1 and str(missing) in flat(inside.stderr) and "Traceback" not in inside.stderr
    assert dict(os.environ) == before

    import pipeline.annotations

    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not a mistake of the user")

    monkeypatch.setattr(pipeline.annotations, "check_annotations", bug)
    crashed = xmei("validate", missing)
    assert crashed.returncode == 1 and "Traceback" in crashed.stderr and crashed.stderr.rstrip().endswith(
        "RuntimeError: a bug, not a mistake of the user")
