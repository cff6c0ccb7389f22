"""Generation as `xmei eval` runs it: the device policy, evaluation split over torchrun processes,
a generation config of our own, and answers cut off at max_new_tokens.

The checkpoint here is untrained (random LQ-Formers before the tiny random LLM): made in seconds,
and its answers differ from clip to clip, so equal predictions say something.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_eval import XMEI, xmei
from test_train import free_port, sets_args

# 24 clips: 6 batches; decoded freely, as 8 tokens cannot hold the answer head that the label constraint
# writes (test_constrain.py evaluates under it)
EVAL = ("run.batch_size_eval=4", "eval.max_new_tokens=8", "eval.constrained=false", "run.device=cpu")


@pytest.fixture(scope="module")
def one_process(untrained, patch_store, tmp_path_factory) -> tuple[Path, str]:
    """`xmei eval` in one process: its output folder and console."""
    out = tmp_path_factory.mktemp("one_process")
    return out, xmei("eval", "--checkpoint", untrained, "--store", patch_store, "--out", out, *sets_args(*EVAL)).stdout


def test_a_device_this_machine_lacks_or_a_wrong_store_is_a_clear_error(untrained, patch_store, corpus, tmp_path):
    wrong = xmei("eval", "--checkpoint", untrained, "--store", tmp_path / "nowhere", "--out", tmp_path, check=False)
    assert wrong.returncode == 1 and "nowhere is not a feature store" in wrong.stderr and "Traceback" not in wrong.stderr
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    bad = sets_args("run.device=cuda:3")
    for args in (("eval", "--checkpoint", untrained, "--store", patch_store, "--out", tmp_path),
                 ("predict", corpus / "videos" / "synth_00000.mp4", "--subtitle", "hi", "--checkpoint", untrained),
                 ("attention", "--checkpoint", untrained, "--store", patch_store, "--clip", "synth_00004",
                  "--out", tmp_path, "--media-root", corpus)):
        result = xmei(*args, *bad, check=False)
        assert result.returncode == 1, (args[0], result.stderr[-2000:])
        assert "error:" in result.stderr and "'cuda:3'" in result.stderr and "GPU(s) visible" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout, args[0]


def test_torchrun_evaluation_equals_one_process(untrained, patch_store, one_process, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), str(XMEI), "eval", "--checkpoint", str(untrained), "--store",
                           str(patch_store), "--out", str(tmp_path), *sets_args(*EVAL)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, console = one_process
    predictions = (tmp_path / "predictions.jsonl").read_text()
    assert predictions == (one / "predictions.jsonl").read_text()  # ranks 0 and 1 took batches 0, 2, 4 and 1, 3, 5
    assert len({json.loads(line)["text"] for line in predictions.splitlines()}) > 10  # answers differ per clip
    results, alone = (json.loads((d / "results.json").read_text()) for d in (tmp_path, one))
    assert results.pop("clips_per_s") > 0 and alone.pop("clips_per_s") > 0
    assert results == alone
    assert proc.stdout.count("cut off at max_new_tokens:") == console.count("cut off at max_new_tokens:") == 1


def test_answers_cut_off_at_max_new_tokens_are_counted(untrained, patch_store, one_process, tmp_path):
    short = xmei("eval", "--checkpoint", untrained, "--store", patch_store, "--out", tmp_path,
                 *sets_args(*EVAL, "eval.max_new_tokens=1")).stdout
    long_out, long_console = one_process
    rows = {d: [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]
            for d in (tmp_path, long_out)}
    results = {d: json.loads((d / "results.json").read_text()) for d in (tmp_path, long_out)}
    assert all(r["cut_off"] for r in rows[tmp_path]) and results[tmp_path]["cut_off"] == 24  # one token each
    assert "cut off at max_new_tokens: 24 of 24 answers" in short
    assert "24 answers cut off at max_new_tokens" in (tmp_path / "report.md").read_text()
    # in 8 tokens the untrained model ends some answers (synth_00018's after one token), not all
    ended = [r["video_id"] for r in rows[long_out] if not r["cut_off"]]
    assert 0 < len(ended) < 24 and results[long_out]["cut_off"] == 24 - len(ended)
    assert f"cut off at max_new_tokens: {24 - len(ended)} of 24 answers" in long_console
    assert f"{24 - len(ended)} answers cut off" in (long_out / "report.md").read_text()
    generation = results[long_out]["generation"]  # the config it generated with
    assert {k: generation[k] for k in ("max_new_tokens", "num_beams", "do_sample", "repetition_penalty")} == \
        {"max_new_tokens": 8, "num_beams": 1, "do_sample": False, "repetition_penalty": 1.0}


def test_the_llm_folders_generation_config_is_ignored(untrained, tiny_models, patch_store, tmp_path):
    from xmei.config import Config
    from xmei.data import StoreSamples
    from xmei.generate import GenerationSettings, generate_store, prompt_batch
    from xmei.model import XMEIQwen

    odd = tmp_path / "llm"
    shutil.copytree(tiny_models / "llm", odd)
    file = odd / "generation_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "repetition_penalty": 3.0, "do_sample": True,
                                "temperature": 0.7, "top_k": 5, "no_repeat_ngram_size": 2, "min_new_tokens": 6}))
    cfg, settings = Config(), GenerationSettings(max_new_tokens=8, batch_size=4, constrained=False)
    plain, other = XMEIQwen.from_checkpoint(untrained), XMEIQwen.from_checkpoint(untrained, llm=odd)
    # the file has teeth: left to fill in what generate() is not told, it changes the greedy answers
    builder = other.prompt_builder()
    batch = prompt_batch(other, StoreSamples([patch_store]).__getitems__([0, 1, 2, 3]), builder)  # the first batch
    inherited = other.llm.generate(inputs_embeds=other.embed(batch), attention_mask=batch["attention_mask"],
                                   max_new_tokens=8, do_sample=False)
    ours, theirs = (generate_store(m, patch_store, cfg.emotions, cfg.intents, settings)[0] for m in (plain, other))
    assert other.tokenizer.batch_decode(inherited, skip_special_tokens=True) != [r["text"] for r in ours[:4]]
    assert theirs == ours
