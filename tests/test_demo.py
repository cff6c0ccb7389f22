"""`xmei demo` plumbing at a small scale.
(The demo's real run, 800 clips and 8 epochs, is the README's main job; its numbers are in the README.)"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

XMEI = Path(sys.executable).parent / "xmei"


def test_demo_runs_end_to_end_and_reruns(tmp_path):
    args = [str(XMEI), "demo", "--out", str(tmp_path / "demo"), "--clips", "40", "--epochs", "1"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert list(summary["results"]) == ["A+V+T", "V+T", "A+T", "Q-Former (learned queries)", "A+V+T, free decoding",
                                        "A+V+T, descriptions removed", "A+V+T, features zeroed",
                                        "A+V+T, absent audio not flagged"]
    for name, result in summary["results"].items():
        assert 0 <= result["emotion_accuracy"] <= 1 and 0 <= result["intent_accuracy"] <= 1
        assert list(result["explanation"]) == ["bleu4", "meteor", "rouge_l", "cider_d", "bertscore", "bleurt"]
        assert result["constrained"] == (name != "A+V+T, free decoding")
        if result["constrained"]:
            assert result["invalid"] == 0, name  # one epoch on 28 clips: labels are valid all the same
    assert summary["epochs"] == {"A+V+T": 1, "V+T": 1, "A+T": 1, "Q-Former (learned queries)": 1}
    assert set(summary["check"]["checks"]) and isinstance(summary["check"]["holds"], bool)
    for path in [*summary["reports"].values(), *summary["confusion"], *summary["attention"], summary["page"]]:
        assert Path(path).is_file(), path
    page = Path(summary["page"])  # A+V+T's evaluation beside the Q-Former's, every test clip with its images
    assert page == tmp_path / "demo" / "eval" / "a_v_t" / "report.html" and "browsable page" in first.stdout
    html = page.read_text()
    test_clips = len((page.parent / "predictions.jsonl").read_text().splitlines())
    assert html.count('<article class="card"') == test_clips and "compared with" in html
    assert html.count("_attention.jpg") == test_clips
    assert "features zeroed" in first.stdout and "attention maps:" in first.stdout and "chance" in first.stdout
    assert "modality check" in first.stdout and "elapsed:" in first.stdout
    served = shlex.split(summary["serve"])  # the command that puts A+V+T, V+T and A+T side by side in a browser
    assert served[:2] == ["xmei", "serve"] and served[2::2] == ["--checkpoint"] * 3
    assert served[3::2] == [summary["checkpoints"][k] for k in ("A+V+T", "V+T", "A+T")] and summary["serve"] in first.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| A+V+T, features zeroed |" in report and "| Q-Former (learned queries) |" in report
    assert "| chance |" in report and "Modality check" in report and "No-audio test clips" in report
    rows = [json.loads(line) for line in (page.parent / "predictions.jsonl").read_text().splitlines()]
    scores = json.loads((page.parent / "results.json").read_text())
    for kind in ("emotion", "intent"):  # every answer's label probabilities, and the calibration they give
        for row in rows:
            probs = row[f"{kind}_probs"]
            assert abs(sum(probs.values()) - 1) < 1e-4 and max(probs, key=probs.get) == row[kind], row["video_id"]
        assert 0 <= scores[kind]["calibration"]["ece"] <= 1 and (page.parent / f"reliability_{kind}.png").is_file()
        for name, result in summary["results"].items():  # the summary's p(true): the rows' own mean
            named = [json.loads(line) for line in
                     (Path(summary["reports"][name]).parent / "predictions.jsonl").read_text().splitlines()]
            mean = sum(r[f"{kind}_probs"][r[f"ref_{kind}"]] for r in named) / len(named)
            assert math.isclose(result[f"{kind}_true_p"], mean, abs_tol=1e-9), name
    # The check that A+V+T's mean p(true label) beats chance by xmei.demo.PROBABILITY_MARGIN is computed and reported
    # (below), not asserted to hold: one epoch on 28 clips is 2 optimizer steps and the model is still at chance
    # (measured on the 6 test clips: emotion 0.151, chance 0.143; intent 0.105, chance 0.111). The full demo
    # (scripts/main.sh: 800 clips, 10 epochs) is where it holds; README's demo table gives its figures.
    assert set(summary["probability_check"]["checks"]) and isinstance(summary["probability_check"]["holds"], bool)
    assert "label probabilities check" in first.stdout and "Label probabilities check" in report
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)  # reuses what is complete
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["results"] == summary["results"]
    other = subprocess.run([*args[:-4], "--clips", "30", "--epochs", "1"], capture_output=True, text=True, timeout=900)
    assert other.returncode == 0, other.stderr[-3000:]  # another corpus: the stale stores and runs are replaced
    assert json.loads((tmp_path / "demo" / "data" / "synth.json").read_text())["n"] == 30

