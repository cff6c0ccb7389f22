"""`xmei demo` plumbing at a small scale, and the GPU benchmark's code path on CPU.
(The demo's real run, 800 clips and 8 epochs, is the README's main job; its numbers are in the README.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
XMEI = Path(sys.executable).parent / "xmei"


def test_demo_runs_end_to_end_and_reruns(tmp_path):
    args = [str(XMEI), "demo", "--out", str(tmp_path / "demo"), "--clips", "40", "--epochs", "1"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert list(summary["results"]) == ["language", "features zeroed", "learned queries"]
    for result in summary["results"].values():
        assert 0 <= result["emotion_accuracy"] <= 1 and 0 <= result["intent_accuracy"] <= 1
        assert list(result["explanation"]) == ["bleu4", "meteor", "rouge_l", "cider_d", "bertscore", "bleurt"]
    for path in [*summary["reports"].values(), *summary["confusion"], summary["attention"]]:
        assert Path(path).is_file(), path
    assert "features zeroed" in first.stdout and "attention map:" in first.stdout and "chance" in first.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| features zeroed |" in report and "| learned queries |" in report and "| chance |" in report
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)  # reuses what is complete
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["results"] == summary["results"]
    other = subprocess.run([*args[:-4], "--clips", "30", "--epochs", "1"], capture_output=True, text=True, timeout=900)
    assert other.returncode == 0, other.stderr[-3000:]  # another corpus: the stale stores and runs are replaced
    assert json.loads((tmp_path / "demo" / "data" / "synth.json").read_text())["n"] == 30


def test_gpu_benchmark_code_path_on_cpu():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(port)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--scale", "tiny", "--clips", "6",
                             "--steps", "2", "--decode-workers", "0", "--camera-rounds", "1"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = dict(line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line)
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["scale"] == "tiny" and float(table["extraction clips/s (CLIP + HuBERT, decode included)"]) > 0
    camera = next(k for k in table if k.startswith("camera-like extraction clips/s"))
    assert float(table[camera]) > 0 and camera.endswith("decode processes, 2 clips)")
    assert table["GPU utilisation during camera-like extraction"] == "unavailable (no nvidia-smi)"
    assert float(table["LoRA training tokens/s (ZeRO-2, bf16)"]) > 0
    assert float(table["eval clips/s (greedy generation, KV cache)"]) > 0
