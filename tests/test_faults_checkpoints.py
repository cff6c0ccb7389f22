"""Fault suite: damaged checkpoints. `xmei eval`, `predict`, `attention` and `train --resume` on a
checkpoint with a missing, cut, overwritten or foreign file, a folder that is not a checkpoint,
a base LLM that moved: each ends with exit status 1 and an error naming the file, no traceback,
and every file of the run kept as it was. eval, predict, attention and report say so before they
import torch."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import EARLIER, KEEP_EVERY_3, LAST, ROOT, TRAIN
from faults import assert_clean_error, assert_kept, flat, snapshot, xmei

RESUME = (*TRAIN, *KEEP_EVERY_3)  # the options of the trained run, for its resume
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A copy of the trained run (conftest: checkpoints step_0000003 and step_0000006), to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# ----------------------------------------------------------------------------- damages

def cut(path: Path) -> None:
    """The first half of the file: a write cut off by a kill or a full disk."""
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def garbage(path: Path) -> None:
    """As many random bytes as the file had."""
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def earlier_layout(path: Path) -> None:
    """Settings as an earlier xmei wrote them: one flat mapping."""
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data["features"], "llm_path": str(data["model"]["llama_model_path"])}))


def newer_layout(path: Path) -> None:
    data = json.loads(path.read_text())
    data["model"]["mixture_of_lqformers"] = 4
    path.write_text(json.dumps(data))


def other_size(path: Path) -> None:
    """The same tensors at half the width: a checkpoint of another model size."""
    save_file({k: v[..., :max(v.shape[-1] // 2, 1)].contiguous() if v.dim() else v for k, v in load_file(path).items()},
              path)


def fewer_keys(path: Path) -> None:
    weights = load_file(path)
    save_file({k: v for k, v in sorted(weights.items())[1:]}, path)


# one case per kind of damage, spread over the files (each CLI run costs seconds)
CUT_OFF = "(the end of the file: cut off?)"
DAMAGES = {  # id: (file in the last checkpoint, damage, words the error says besides the file's path: one or a tuple)
    "settings-missing": ("xmei_model.json", remove, "is missing"),
    "settings-cut": ("xmei_model.json", cut, ("(the checkpoint's settings) is not valid JSON", CUT_OFF)),
    "settings-earlier-layout": ("xmei_model.json", earlier_layout, "earlier xmei"),
    "settings-newer-layout": ("xmei_model.json", newer_layout, "mixture_of_lqformers"),
    "config-cut": ("config.yaml", cut, "cut off"),
    "config-garbage": ("config.yaml", garbage, "(the run's config) is not UTF-8 text: byte"),
    "trainable-cut": ("trainable.safetensors", cut, "cut off"),
    "trainable-garbage": ("trainable.safetensors", garbage, "not a whole safetensors file"),
    "trainable-other-model-size": ("trainable.safetensors", other_size, "wrong shapes"),
    "adapter-folder-missing": ("adapter", remove, "is missing"),
    "adapter-config-cut": ("adapter/adapter_config.json", cut,
                           ("(the LoRA adapter's config) is not valid JSON", CUT_OFF)),
    "adapter-weights-cut": ("adapter/adapter_model.safetensors", cut, "cut off"),
    "adapter-weights-fewer-keys": ("adapter/adapter_model.safetensors", fewer_keys, "lacks"),
}


def eval_args(checkpoint: Path, store: Path, out: Path) -> tuple:
    return "eval", "--checkpoint", checkpoint, "--store", store, "--out", out


@pytest.mark.parametrize("case", list(DAMAGES))
def test_eval_names_the_damaged_file(case, run, patch_store, tmp_path):
    name, damage, words = DAMAGES[case]
    damage(run / LAST / name)
    kept = snapshot(run)
    result = xmei(*eval_args(run / LAST, patch_store, tmp_path / "eval"))
    assert_clean_error(result, run / LAST / name, *([words] if isinstance(words, str) else words))
    assert_kept(kept)
    assert not (tmp_path / "eval").exists()


def test_a_checkpoint_from_before_a_config_section_existed_still_loads(run):
    """config.yaml of an earlier xmei lacks the sections added since (checkpoint.LATER_SECTIONS):
    they take their defaults; one cut before its last section is still damaged."""
    import yaml

    from xmei.checkpoint import LATER_SECTIONS, CheckpointError, verify_checkpoint
    from xmei.predictor import checkpoint_config

    path = run / LAST / "config.yaml"
    written = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({k: v for k, v in written.items() if k not in LATER_SECTIONS}, sort_keys=False))
    verify_checkpoint(run / LAST)
    assert checkpoint_config(run / LAST).serve.max_seconds == 60
    path.write_text(yaml.safe_dump({k: v for k, v in written.items() if k != "labels"}, sort_keys=False))
    with pytest.raises(CheckpointError, match=r"lacks the config sections \['labels'\]"):
        verify_checkpoint(run / LAST)


# Runs `xmei ARGS` for each ARGS in argv[1] (JSON) in one fresh interpreter, as main does, and
# prints for each: its exit status, its stderr and which of torch, transformers, peft were imported.
CHECKS_FIRST = """
import contextlib, io, json, sys
import cli
ran = []
for args in json.loads(sys.argv[1]):
    sys.argv, err, status = ["xmei", *args], io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as e:
            status = e.code
    ran.append({"status": status, "stderr": err.getvalue(),
                "heavy": [m for m in ("torch", "transformers", "peft") if m in sys.modules]})
print(json.dumps(ran))
"""


def assert_named_first(cases: list[tuple[tuple, object]]) -> None:
    """Each case (the args of `xmei`, what its error names: one or a list) ends with status 1 and an
    error naming it, no traceback, before torch, transformers or peft are imported (all run in one
    fresh interpreter: CHECKS_FIRST)."""
    env = {**{k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    argv = json.dumps([[str(a) for a in args] for args, _ in cases])
    proc = subprocess.run([sys.executable, "-c", CHECKS_FIRST, argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (args, culprits), ran in zip(cases, json.loads(proc.stdout.splitlines()[-1]), strict=True):
        said = flat(ran["stderr"])
        assert ran["status"] == 1 and "error:" in said, (args[0], said[-2000:])
        for culprit in culprits if isinstance(culprits, list) else [culprits]:
            assert flat(str(culprit)) in said, (args[0], culprit, said[-2000:])
        assert "Traceback" not in said, said[-2000:]
        assert not ran["heavy"], f"{args[0]} imported {ran['heavy']} before it named {culprits}"


def test_checkpoints_and_stores_are_checked_before_torch_loads(run, patch_store, corpus, tmp_path):
    """eval, predict, attention and report name a damaged checkpoint file, or a store's missing
    shard file, before they import torch, transformers or peft (seconds, not a 7B model's load)."""
    damaged = run / LAST / "trainable.safetensors"
    cut(damaged)
    store = Path(shutil.copytree(patch_store, tmp_path / "store"))
    shard = store / "visual" / "c" / "1" / "0" / "0" / "0"
    shard.unlink()
    kept = snapshot(run, store)
    video, maps = corpus / "videos" / "synth_00000.mp4", ("--clip", "synth_00004", "--out", tmp_path / "maps")
    cases = [  # (args, the file its error names)
        (eval_args(run / LAST, patch_store, tmp_path / "eval"), damaged),
        (("predict", video, "--subtitle", "Hi.", "--checkpoint", run / LAST), damaged),
        (("attention", "--checkpoint", run / EARLIER, "--checkpoint", run / LAST, "--store", patch_store, *maps,
          "--media-root", corpus), damaged),
        (("report", tmp_path / "eval", "--store", patch_store, "--checkpoint", run / LAST, "--media-root", corpus),
         damaged),
        (eval_args(run / EARLIER, store, tmp_path / "eval"), shard),
        (("attention", "--checkpoint", run / EARLIER, "--store", store, *maps, "--media-root", corpus), shard),
        (("report", tmp_path / "eval", "--store", store, "--checkpoint", run / EARLIER, "--media-root", corpus), shard),
    ]
    assert_named_first(cases)
    assert_kept(kept)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "maps").exists()


@pytest.fixture(scope="module")
def full_llm(trained_run, tmp_path_factory) -> Path:
    """A checkpoint of a run that trained the whole LLM (model.use_lora false): its own llm/ folder."""
    import yaml

    from xmei.model import XMEIQwen, XMEISettings

    source = trained_run / LAST
    data = json.loads((source / "xmei_model.json").read_text())
    data["model"]["use_lora"] = False
    model = XMEIQwen(XMEISettings.from_json(data))
    folder = tmp_path_factory.mktemp("full") / "step_0000001"
    model.save_checkpoint(folder, config=yaml.safe_load((source / "config.yaml").read_text()))
    restored = XMEIQwen.from_checkpoint(folder)  # whole, it loads
    assert restored.settings.llm_part == "llm" and not hasattr(restored.llm, "peft_config")
    return folder


def test_a_damaged_full_llm_folder_is_named(full_llm, patch_store, tmp_path):
    checkpoint = Path(shutil.copytree(full_llm, tmp_path / "step_0000001"))
    cut(checkpoint / "llm" / "model.safetensors")
    kept = snapshot(checkpoint)
    result = xmei(*eval_args(checkpoint, patch_store, tmp_path / "eval"))
    assert_clean_error(result, checkpoint / "llm" / "model.safetensors", "cut off")
    assert_kept(kept)


# ----------------------------------------------------------------------------- not a checkpoint

NEWEST = f"e.g. the newest, --checkpoint {{run}}/{LAST}"
NOT_CHECKPOINTS = {  # id: (folder given, relative to the run, or None for the tiny models folder; words said)
    "missing-folder": ("checkpoints/step_0000099", ["does not exist"]),
    "a-models-folder": (None, ["is not an xmei checkpoint"]),
    "the-run-folder": (".", ["is a training run's folder", NEWEST]),
    "a-partial-checkpoint": ("checkpoints/step_0000009.partial", ["cut off while being written",
                                                                  f"e.g. the newest, {{run}}/{LAST}"]),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_a_folder_that_is_not_a_checkpoint(case, run, tiny_models, patch_store, tmp_path):
    where, words = NOT_CHECKPOINTS[case]
    folder = tiny_models if where is None else run / where
    if case == "a-partial-checkpoint":  # a kill while step 9 was written: all but config.yaml
        shutil.copytree(run / LAST, folder, ignore=shutil.ignore_patterns("config.yaml"))
    kept = snapshot(run)
    result = xmei(*eval_args(folder, patch_store, tmp_path / "eval"))
    assert_clean_error(result, folder, *(w.format(run=run) for w in words))
    assert_kept(kept)


def test_a_base_llm_that_moved_is_named_with_how_to_point_at_it(run, tiny_models, patch_store, tmp_path):
    from xmei.model import XMEIQwen

    moved = tmp_path / "moved"
    shutil.copytree(tiny_models / "llm", moved)
    for name in ("xmei_model.json", "config.yaml"):  # recorded where it was before the move
        file = run / LAST / name
        file.write_text(file.read_text().replace(str(tiny_models / "llm"), str(tmp_path / "was-here")))
    kept = snapshot(run)
    result = xmei(*eval_args(run / LAST, patch_store, tmp_path / "eval"))
    assert_clean_error(result, f"the base LLM folder {tmp_path / 'was-here'}", "--set model.llama_model_path=DIR",
                       "--models DIR")
    assert_kept(kept)
    assert XMEIQwen.from_checkpoint(run / LAST, llm=moved).settings.model.llama_model_path == moved
    pointed = xmei(*eval_args(run / LAST, patch_store, tmp_path / "eval"), "--set", f"model.llama_model_path={moved}",
                   "--set", "eval.max_new_tokens=20")  # as the message says: the run evaluates
    assert pointed.returncode == 0, pointed.stderr[-3000:]
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()


# ----------------------------------------------------------------------------- train --resume

def resume(tiny_models: Path, store: Path, out: Path, *extra: str):
    sets = [a for s in (*RESUME, "run.max_epoch=2") for a in ("--set", s)]
    return xmei("train", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--store", store,
                "--output-dir", out, *sets, "--resume", *extra)


RESUME_DAMAGES = {  # id: (file in the last checkpoint, damage, words)
    "state-cut": ("trainer_state.pt", cut, "not a whole torch file"),
    "adapter-weights-fewer-keys": ("adapter/adapter_model.safetensors", fewer_keys, "lacks"),
}


@pytest.mark.parametrize("case", list(RESUME_DAMAGES))
def test_resume_names_the_damaged_file_and_the_earlier_checkpoint(case, run, tiny_models, patch_store):
    name, damage, words = RESUME_DAMAGES[case]
    damage(run / LAST / name)
    kept = snapshot(run)
    result = resume(tiny_models, patch_store, run)
    assert_clean_error(result, run / LAST / name, words, f"to resume from step_0000003 instead, move {run / LAST} out "
                                                         f"of {run / 'checkpoints'}")
    assert_kept(kept)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]


def test_resume_of_an_earlier_trainer_state_is_refused(run, tiny_models, patch_store):
    import torch

    state = torch.load(run / LAST / "trainer_state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "shape"}, run / LAST / "trainer_state.pt")
    kept = snapshot(run)
    assert_clean_error(resume(tiny_models, patch_store, run), run / LAST, "earlier xmei")
    assert_kept(kept)


def test_resume_with_deepspeed_needs_the_deepspeed_states(run, tiny_models, patch_store):
    """A run trained with --engine torch has no DeepSpeed states to resume with --engine deepspeed."""
    kept = snapshot(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    result = xmei("train", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--store", patch_store,
                  "--output-dir", run, *[a for s in RESUME for a in ("--set", s)], "--resume", "--engine", "deepspeed",
                  env=env)
    assert_clean_error(result, run / LAST / "deepspeed" / "state", "--engine torch")
    assert_kept(kept)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_whole_one(run, tiny_models, patch_store):
    partial = run / "checkpoints" / "step_0000009.partial"  # the kill came while step 9 was written
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes((run / LAST / "trainable.safetensors").read_bytes()[:1000])
    kept = snapshot(run / EARLIER, run / LAST)
    result = resume(tiny_models, patch_store, run)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "done: 12 steps" in result.stdout
    assert_kept(kept)
    records = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))  # on from step 6, once each
    from xmei.model import verify_checkpoint

    for step in (9, 12):  # written whole this time
        verify_checkpoint(run / "checkpoints" / f"step_{step:07d}")


# ----------------------------------------------------------------------------- stores of other features

PATCH, POOLED = "patch visual features (8, 257, 64)", "pooled visual features (8, 32)"


def trained_on(checkpoint: Path, what: str) -> str:
    return f"; the checkpoint {checkpoint} was trained on {what}"


def earlier_facts(checkpoint: Path, out: Path) -> Path:
    """A copy of ``checkpoint`` whose settings hold only the feature facts an earlier xmei kept
    (widths, frames, windows, captions, dtype: no shapes, audio settings or encoders)."""
    shutil.copytree(checkpoint, out)
    data = json.loads((out / "xmei_model.json").read_text())
    kept = ("visual_size", "audio_size", "num_frames", "num_audio_clips", "caption_vocab_size", "caption_tokens",
            "compute_dtype")
    data["features"] = {k: data["features"][k] for k in kept}
    (out / "xmei_model.json").write_text(json.dumps(data))
    return out


def test_a_store_of_other_features_is_refused_before_torch_loads(trained_run, pooled_store, corpus, tmp_path):
    """Issue 23: eval, report and attention on a store of pooled visual features, against checkpoints
    trained on patch features, name both before they import torch (not a shape error in the
    LQ-Former's forward once the LLM has loaded); a checkpoint of an earlier xmei, which kept only
    widths and frames, too."""
    last, earlier = trained_run / LAST, earlier_facts(trained_run / LAST, tmp_path / "earlier" / "step_0000006")
    maps = ("--clip", "synth_00004", "--out", tmp_path / "maps", "--media-root", corpus)
    refused = [str(pooled_store), f"{pooled_store} has {POOLED}", trained_on(last, PATCH)]
    assert_named_first([
        (eval_args(last, pooled_store, tmp_path / "eval"), refused),
        (("report", tmp_path / "eval", "--store", pooled_store, "--checkpoint", last, "--media-root", corpus), refused),
        (("attention", "--checkpoint", trained_run / EARLIER, "--checkpoint", last, "--store", pooled_store, *maps),
         [f"{pooled_store} has {POOLED}", trained_on(trained_run / EARLIER, PATCH)]),
        (eval_args(earlier, pooled_store, tmp_path / "eval"),
         [f"{pooled_store} has {POOLED}", trained_on(earlier, "visual features of 8 frames, width 64")]),
    ])
    assert not (tmp_path / "eval").exists() and not (tmp_path / "maps").exists()


def test_a_store_of_other_encoders_and_audio_settings_is_refused_before_the_model_loads(trained_run, patch_store,
                                                                                        tmp_path, monkeypatch):
    from xmei.model import XMEIQwen

    store = Path(shutil.copytree(patch_store, tmp_path / "store"))
    meta = json.loads((store / "zarr.json").read_text())  # the same shapes, from another HuBERT, 2 layers a window
    hubert = meta["attributes"]["encoders"]["audio"]["config_sha256"]
    meta["attributes"]["encoders"]["audio"]["config_sha256"] = "0123456789abcdef"
    meta["attributes"]["extract"]["audio_layers"] = 2
    (store / "zarr.json").write_text(json.dumps(meta))
    monkeypatch.setattr(XMEIQwen, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    result = xmei(*eval_args(trained_run / LAST, store, tmp_path / "eval"))
    encoder = "audio features of the encoder tiny-hubert whose config files hash to"
    assert_clean_error(result, f"{store} has audio features averaged over HuBERT's last 2 layers and {encoder} "
                               "0123456789abcdef",
                       trained_on(trained_run / LAST, f"audio features averaged over HuBERT's last 4 layers and "
                                                      f"{encoder} {hubert}"))
    assert not (tmp_path / "eval").exists()


def test_resume_on_a_store_of_other_features_is_refused_before_the_model_is_built(run, tiny_models, pooled_store,
                                                                                 monkeypatch):
    monkeypatch.setattr("xmei.train.XMEIQwen", lambda *a, **k: pytest.fail("the model was built"))
    kept = snapshot(run)
    assert_clean_error(resume(tiny_models, pooled_store, run), f"{pooled_store} has {POOLED}",
                       trained_on(run / LAST, PATCH), "resume on stores of the features it was trained on")
    assert_kept(kept)


def models_with_another_clip(tiny_models: Path, out: Path) -> Path:
    """``tiny_models`` (linked) but for a visual encoder whose config.json is another (a key more)."""
    out.mkdir()
    for folder in tiny_models.iterdir():
        (out / folder.name).symlink_to(folder)
    (out / "visual_encoder").unlink()
    shutil.copytree(tiny_models / "visual_encoder", out / "visual_encoder")
    config = json.loads((out / "visual_encoder" / "config.json").read_text())
    (out / "visual_encoder" / "config.json").write_text(json.dumps({**config, "note": "another CLIP"}))
    return out


def test_predict_extracting_other_features_is_refused_before_a_clip_is_read(trained_run, tiny_models, corpus,
                                                                           tmp_path, monkeypatch):
    """`xmei predict` extracts the clip with the command's config: one whose extract settings or
    encoders give other features than the checkpoint's is refused before the clip is decoded or a
    model loads (the encoders' configs are read, no weights)."""
    monkeypatch.setattr("xmei.predictor.Predictor.__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    last, video = trained_run / LAST, corpus / "videos" / "synth_00000.mp4"
    sets = ["extract.visual_tokens=pooled", "extract.num_audio_clips=4", "extract.audio_clip_seconds=1",
            "extract.caption_tokens=8"]
    result = xmei("predict", video, "--subtitle", "Hi.", "--checkpoint", last, *[a for s in sets for a in ("--set", s)])
    assert_clean_error(result, f"a clip extracted with the checkpoint's config with --set has {POOLED} and "
                               "audio features of 4 windows, width 64 (4, 64) and audio windows of 1 s and captions of "
                               "8 tokens",
                       trained_on(last, f"{PATCH} and audio features of 8 windows, width 64 (8, 64) and audio windows "
                                        "of 2 s and captions of 16 tokens"),
                       "predict with the checkpoint's own extract settings and encoders")
    assert result.stdout == ""
    models = models_with_another_clip(tiny_models, tmp_path / "models")
    result = xmei("predict", video, "--subtitle", "Hi.", "--checkpoint", last, "--config", TINY, "--models", models)
    assert_clean_error(result, f"a clip extracted with --config {TINY} with --models has visual features of "
                               "the encoder tiny-clip-vit-14 whose config files hash to",
                       trained_on(last, "visual features of the encoder tiny-clip-vit-14 whose config files hash to "))


# what a store of other settings would record (the patch store's facts, changed), and the two sides named
OTHER_FEATURES = {
    "pooled": ({"visual_shape": [8, 32]}, POOLED, PATCH),
    "frames": ({"visual_shape": [4, 257, 64]}, "patch visual features (4, 257, 64)", PATCH),
    "patches": ({"visual_shape": [8, 577, 64]}, "patch visual features (8, 577, 64)", PATCH),
    "visual-width": ({"visual_shape": [8, 257, 1024]}, "patch visual features (8, 257, 1024)", PATCH),
    "audio-windows": ({"audio_shape": [16, 64]}, "audio features of 16 windows, width 64 (16, 64)",
                      "audio features of 8 windows, width 64 (8, 64)"),
    "audio-width": ({"audio_shape": [8, 1024]}, "audio features of 8 windows, width 1024 (8, 1024)",
                    "audio features of 8 windows, width 64 (8, 64)"),
    "audio-seconds": ({"audio_clip_seconds": 0.5}, "audio windows of 0.5 s", "audio windows of 2 s"),
    "audio-layers": ({"audio_layers": 1}, "audio features averaged over HuBERT's last 1 layer",
                     "audio features averaged over HuBERT's last 4 layers"),
    "caption-tokens": ({"caption_tokens": 32}, "captions of 32 tokens", "captions of 16 tokens"),
    "caption-tokenizer": ({"encoders": {"caption_tokenizer": {"config_sha256": "f" * 16}}},
                          f"captions of the caption tokenizer whose config files hash to {'f' * 16}",
                          "captions of the caption tokenizer whose config files hash to "),
    "visual-encoder": ({"encoders": {"visual": {"name": "clip-b", "config_sha256": "f" * 16}}},
                       f"visual features of the encoder clip-b whose config files hash to {'f' * 16}",
                       "visual features of the encoder tiny-clip-vit-14 whose config files hash to "),
}


@pytest.mark.parametrize("kind", OTHER_FEATURES)
def test_every_kind_of_other_features_is_named(kind, patch_store, trained_run):
    """Each fact of the features a store can differ in is named on both sides; the encoders by
    their config files' hash (a renamed encoder of the same files is the same), and only what the
    checkpoint's modalities read."""
    from stores import FeatureStore
    from xmei.checkpoint import verify_checkpoint
    from xmei.settings import feature_facts, fit_problems

    settings = verify_checkpoint(trained_run / LAST)
    facts = feature_facts(FeatureStore(patch_store))
    assert fit_problems(facts, settings.features, settings.modalities) == []
    change, found, trained = OTHER_FEATURES[kind]
    other = {**facts, **change, "encoders": {k: {**v, **change.get("encoders", {}).get(k, {})}
                                             for k, v in facts["encoders"].items()}}
    [(said_found, said_trained)] = fit_problems(other, settings.features, settings.modalities)
    assert said_found == found and said_trained.startswith(trained)
    modality = "audio" if kind.startswith("audio") else "video" if kind.startswith(("visual", "pooled", "frames",
                                                                                    "patches")) else None
    if modality:  # a model without that modality does not read those features
        assert fit_problems(other, settings.features, [m for m in ("video", "audio") if m != modality]) == []


def test_an_encoder_of_another_name_but_the_same_files_fits(patch_store, trained_run):
    from stores import FeatureStore
    from xmei.checkpoint import verify_checkpoint
    from xmei.settings import feature_facts, fit_problems

    settings = verify_checkpoint(trained_run / LAST)
    facts = feature_facts(FeatureStore(patch_store))
    facts["encoders"]["visual"]["name"] = "openai/clip-vit-large-patch14"
    assert fit_problems(facts, settings.features, settings.modalities) == []
