"""Benchmark of prediction on raw clips: bulk `xmei predict --annotations` against the one-clip
command run once per clip, as a shell loop would.

Builds its own inputs (not timed): the tiny models, a synthetic corpus, and a checkpoint of the
tiny config saved before any training step (its answers run as long as a trained model's may:
eval.max_new_tokens; both paths generate the very same tokens). Then it measures:

- bulk: `xmei predict --annotations FILE --checkpoint CK --out DIR --workers 0`, one process:
  start-up, extraction of every clip into DIR/store, the model loaded once, batched generation
  and the outputs, wall time over all clips;
- one clip at a time: `xmei predict VIDEO --subtitle TEXT --checkpoint CK` as a subprocess per
  clip (each starts Python, loads the encoders and the model, decodes, generates), wall time
  over the first --single clips (default 10: each costs seconds of start-up), as clips/s;
- the ratio (goal: at least 5x on this CPU for 50 clips);
- speech recognition (`xmei annotate`'s Transcriber, the tiny random Whisper of the model set) on
  the bulk run's clips: the model's load time and seconds per clip (reading the audio included).
  The tiny Whisper's cost is not a real Whisper's: on a GPU farm measure with model.asr_path set
  to a real checkpoint (`measure_asr`).

Run:  .venv/bin/python bench/predict.py [--clips 50] [--single 10] [--out DIR]
(--out keeps the corpus, models and checkpoint; by default a temporary folder is removed.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

XMEI = Path(sys.executable).parent / "xmei"
SETS = ("eval.max_new_tokens=32", "run.device=cpu")


def build_inputs(folder: Path, clips: int) -> tuple[Path, Path, list[dict]]:
    """(checkpoint, media root, the records of ``clips`` clips, labels emptied)."""
    from pipeline.extract import extract
    from pipeline.synth import synth_corpus
    from pipeline.tiny_models import build_tiny_models
    from xmei.config import Config, load_config
    from xmei.train import Trainer

    models, corpus = folder / "models", folder / "corpus"
    if not (models / "tiny_models.json").is_file():
        build_tiny_models(models, seed=0)
    if not (corpus / "annotations").is_dir():
        labels = Config()
        synth_corpus(corpus, round(clips / 0.7) + 2, 0, labels.emotions, labels.intents)
    records = json.loads((corpus / "annotations" / "train.json").read_text())[:clips]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*SETS, "run.batch_size_train=4"], models_dir=models)
    checkpoints = folder / "run" / "checkpoints"
    if not checkpoints.is_dir():
        few = folder / "few.json"
        few.write_text(json.dumps(records[:4]))
        extract(cfg, few, corpus, folder / "few_store", workers=0)
        trainer = Trainer(cfg, [folder / "few_store"], None, folder / "run")
        trainer.setup()
        trainer.save_checkpoint()
        trainer.cleanup()
    for r in records:
        r.update(emotion="", intent="")
    return sorted(checkpoints.iterdir())[-1], corpus, records


def run(args: list) -> float:
    """Seconds of `xmei ARGS` in a fresh process (it must succeed)."""
    start = time.perf_counter()
    proc = subprocess.run([str(XMEI), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"xmei {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=50, help="clips of the bulk run")
    parser.add_argument("--single", type=int, default=10, help="clips run one command each (the first ones)")
    parser.add_argument("--out", type=Path, help="keep the inputs here (default: a temporary folder)")
    a = parser.parse_args()
    from pipeline.annotate import measure_asr

    print(f"load average at the start: {os.getloadavg()[0]:.2f} (compare runs only when it is low)")
    folder = a.out or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        checkpoint, corpus, records = build_inputs(folder, a.clips)
        annotations = folder / "unlabeled.json"
        annotations.write_text(json.dumps(records))
        sets = [x for s in SETS for x in ("--set", s)]
        shutil.rmtree(folder / "bulk", ignore_errors=True)
        bulk_s = run(["predict", "--annotations", annotations, "--media-root", corpus, "--checkpoint", checkpoint,
                      "--out", folder / "bulk", "--workers", "0", *sets])
        predicted = json.loads((folder / "bulk" / "predict.json").read_text())["predicted"]
        single = records[:a.single]
        single_s = sum(run(["predict", corpus / r["video_path"], "--subtitle", r["subtitle"], "--checkpoint",
                            checkpoint, *(["--audio", corpus / r["audio_path"]] if r["audio_path"] else []), *sets])
                       for r in single)
        bulk_rate, single_rate = predicted / bulk_s, len(single) / single_s
        print(f"bulk `xmei predict --annotations` ({predicted} clips, extraction included, one process): "
              f"{bulk_s:.1f} s, {bulk_rate:.2f} clips/s")
        print(f"one `xmei predict VIDEO` per clip ({len(single)} clips): {single_s:.1f} s, {single_rate:.3f} clips/s "
              f"({single_s / len(single):.1f} s a clip)")
        print(f"ratio: {bulk_rate / single_rate:.1f}x (goal: at least 5x)")
        heard = [(corpus / r["video_path"], corpus / r["audio_path"] if r["audio_path"] else None) for r in records]
        asr = measure_asr(folder / "models" / "asr", heard, "cpu")
        print(f"ASR (tiny random Whisper, {asr['clips']} clips, batches of 8): load {asr['load_s']:.2f} s, "
              f"{asr['seconds_per_clip']:.3f} s a clip")
    finally:
        if a.out is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
