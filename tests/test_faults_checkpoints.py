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
    env = {**{k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    argv = json.dumps([[str(a) for a in args] for args, _ in cases])
    proc = subprocess.run([sys.executable, "-c", CHECKS_FIRST, argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (args, culprit), ran in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        said = flat(ran["stderr"])
        assert ran["status"] == 1 and "error:" in said and str(culprit) in said, (args[0], said[-2000:])
        assert "Traceback" not in said, said[-2000:]
        assert not ran["heavy"], f"{args[0]} imported {ran['heavy']} before it named {culprit}"
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
