"""Label-constrained answers: the trie of answer heads, generation under it (greedy and beam
search) against free decoding of the same untrained model, and `xmei eval --compare-free`.

The checkpoint is untrained (random LQ-Formers before the tiny random LLM): decoding freely it
rarely names a label, so a constraint that works shows in every row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from test_eval import XMEI, xmei
from test_train import free_port, sets_args
from xmei.config import Config
from xmei.constrain import LabelConstraint, answer_head
from xmei.parse import parse_answer

LABELS = Config()
ON_CPU = ("run.batch_size_eval=8", "run.device=cpu")  # 24 clips: 3 batches
EVAL = (*ON_CPU, "eval.max_new_tokens=24")


@pytest.fixture(scope="module")
def constraint(tiny_models) -> LabelConstraint:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    return LabelConstraint(tokenizer, LABELS.emotions.labels, LABELS.intents.labels)


def paths(constraint: LabelConstraint, prefix: tuple[int, ...] = ()):
    """Every token sequence the constraint lets a row write until it is free."""
    allowed = constraint.allowed(prefix)
    if allowed is None:
        yield prefix
        return
    for token in allowed.tolist():
        yield from paths(constraint, prefix + (token,))


def test_every_path_of_the_trie_spells_one_answer_head(constraint, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    spelled = [tokenizer.decode(p) for p in paths(constraint)]
    pairs = [(e, i) for e in LABELS.emotions.labels for i in LABELS.intents.labels]
    assert sorted(spelled) == sorted(answer_head(e, i) for e, i in pairs)  # 63: each pair once, nothing else
    for text in spelled:
        parsed = parse_answer(text + " the face is red.", LABELS.emotions, LABELS.intents)
        assert (parsed.emotion, parsed.intent) in pairs and parsed.explanation == "the face is red"
    assert constraint.depth == max(len(p) for p in paths(constraint))


def test_the_processor_refuses_tokens_off_the_trie_and_frees_a_complete_head(constraint, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    head = list(next(paths(constraint)))
    at_emotion = len(tokenizer(answer_head("happy", "agreeing").split(" happy")[0])["input_ids"])
    prompt = [11, 12, 13]  # ids before the answer: the first call's length marks where answers start
    processor = constraint.processor()
    vocab = len(tokenizer)
    assert torch.isfinite(processor(torch.tensor([prompt, prompt]), torch.zeros(2, vocab))).sum(1).tolist() == [1, 1]
    rows = torch.tensor([prompt + head[:at_emotion], prompt + head[:at_emotion]])  # (2, 3 + at_emotion)
    scores = processor(rows, torch.zeros(2, vocab))
    firsts = {tokenizer(" " + e)["input_ids"][0] for e in LABELS.emotions.labels}
    assert set(torch.isfinite(scores[0]).nonzero().flatten().tolist()) == firsts  # a label's first token only
    wrong = tokenizer(" banana")["input_ids"][0]
    assert wrong not in firsts and scores[1, wrong] == -float("inf")
    assert scores[0, tokenizer.eos_token_id] == -float("inf")  # no ending inside the head
    done = processor(torch.tensor([prompt + head + [wrong]] * 2), torch.zeros(2, vocab))
    assert torch.equal(done, torch.zeros(2, vocab))  # the explanation, and its end, are free


def test_constrained_answers_are_all_valid_and_free_ones_are_not(untrained, patch_store):
    from xmei.evaluate import score
    from xmei.generate import GenerationSettings, generate_store
    from xmei.model import XMEIQwen

    model = XMEIQwen.from_checkpoint(untrained)
    settings = GenerationSettings(max_new_tokens=24, batch_size=8)
    rows, _ = generate_store(model, patch_store, LABELS.emotions, LABELS.intents, settings, compare_free=True)
    assert len(rows) == 24
    assert all(r["emotion"] in LABELS.emotions.labels and r["intent"] in LABELS.intents.labels for r in rows)
    assert all(r["text"].startswith(answer_head(r["emotion"], r["intent"])) for r in rows)
    assert len({(r["emotion"], r["intent"]) for r in rows}) > 1  # the labels are the model's choice, not one forced pair
    invalid = [r for r in rows if r["free"]["emotion"] is None or r["free"]["intent"] is None]
    assert invalid, [r["free"]["text"] for r in rows]  # the same model, decoding freely, names no label there
    alone, _ = generate_store(model, patch_store, LABELS.emotions, LABELS.intents, settings)
    assert [{k: v for k, v in r.items() if k != "free"} for r in rows] == alone  # free decoding changes nothing

    results = score(rows, LABELS.emotions, LABELS.intents, LABELS.eval)
    free = results["free_decoding"]
    assert results["emotion"]["invalid"] == results["intent"]["invalid"] == 0
    assert free["emotion"]["invalid"] + free["intent"]["invalid"] == \
        sum((r["free"]["emotion"] is None) + (r["free"]["intent"] is None) for r in rows) > 0
    assert free["emotion"]["accuracy"] == sum(r["free"]["emotion"] == r["ref_emotion"] for r in rows) / 24

    beams, _ = generate_store(model, patch_store, LABELS.emotions, LABELS.intents,
                              GenerationSettings(max_new_tokens=20, num_beams=2, batch_size=8))
    assert all(r["emotion"] in LABELS.emotions.labels and r["intent"] in LABELS.intents.labels for r in beams)
    with pytest.raises(ValueError, match="cannot hold the answer head"):
        generate_store(model, patch_store, LABELS.emotions, LABELS.intents, GenerationSettings(max_new_tokens=8))


@pytest.fixture(scope="module")
def compared(untrained, patch_store, tmp_path_factory) -> tuple[Path, str]:
    """`xmei eval --compare-free` in one process: its output folder and console."""
    out = tmp_path_factory.mktemp("compared")
    return out, xmei("eval", "--checkpoint", untrained, "--store", patch_store, "--out", out, "--compare-free",
                     *sets_args(*EVAL)).stdout


def test_eval_reports_constrained_and_free_decoding(compared, untrained, patch_store, tmp_path):
    compared, console = compared
    results = json.loads((compared / "results.json").read_text())
    assert results["constrained"] is True and results["emotion"]["invalid"] == results["intent"]["invalid"] == 0
    free = results["free_decoding"]
    assert {"emotion", "intent", "joint", "cut_off"} <= free.keys() and free["emotion"]["invalid"] > 0
    assert f"free decoding: emotion accuracy {free['emotion']['accuracy']:.4f} ({free['emotion']['invalid']} " \
        "invalid)" in console
    report = (compared / "report.md").read_text()
    assert "emotion and intent constrained to the labels" in report and "| emotion (free decoding) |" in report
    xmei("score", compared / "predictions.jsonl", "--out", tmp_path / "score")  # from the rows alone
    assert json.loads((tmp_path / "score" / "results.json").read_text())["free_decoding"] == free
    assert "| intent (free decoding) |" in (tmp_path / "score" / "report.md").read_text()

    freely = xmei("eval", "--checkpoint", untrained, "--store", patch_store, "--out", tmp_path / "free", "--free",
                  *sets_args(*EVAL))
    rows = [json.loads(line) for line in (tmp_path / "free" / "predictions.jsonl").read_text().splitlines()]
    first = [json.loads(line)["free"] for line in (compared / "predictions.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in first[0]} for r in rows] == first  # --free gives the compared free answers
    assert json.loads((tmp_path / "free" / "results.json").read_text())["constrained"] is False
    assert "decoded freely" in (tmp_path / "free" / "report.md").read_text() and "free decoding:" not in freely.stdout

    for bad, message in ((["--free", "--compare-free"], "--compare-free compares"),
                         (sets_args("eval.max_new_tokens=8"), "cannot hold the answer head")):
        result = xmei("eval", "--checkpoint", untrained, "--store", patch_store, "--out", tmp_path / "bad", *bad,
                      *sets_args(*ON_CPU), check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_torchrun_constrained_evaluation_equals_one_process(compared, untrained, patch_store, tmp_path):
    compared, _ = compared
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), str(XMEI), "eval", "--checkpoint", str(untrained), "--store",
                           str(patch_store), "--out", str(tmp_path), "--compare-free", *sets_args(*EVAL)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "predictions.jsonl").read_text() == (compared / "predictions.jsonl").read_text()
    results, alone = (json.loads((d / "results.json").read_text()) for d in (tmp_path, compared))
    assert results.pop("clips_per_s") > 0 and alone.pop("clips_per_s") > 0
    assert results == alone
