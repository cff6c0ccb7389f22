"""The browsable report at scale: a 2,000-clip evaluation with every image, its size, its build
time, and how long a headless browser takes to open it filtered, against the demo's own page.

    bash scripts/main.sh            # (or xmei demo) once: the demo's store, media, checkpoint, answers
    .venv/bin/python bench/report.py [--demo runs/demo] [--clips 2000]

The clips are the demo's 120 test clips repeated (each copy its own video_id, store row and
card), with the demo's A+V+T answers and its checkpoint's attention; the explanation metrics in
results.json are the 120-clip evaluation's, copied (the page shows them, this measures the page).
The same is done for the 120 clips once, and each figure is printed for both with their ratio.
Chromium (Debian's package) opens each page with a filter in its URL fragment (the time until
it prints the DOM: the page loaded, filtered, and the images near the view loaded); the cards it
leaves shown are checked against the answers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stores import OK, FeatureSpec, FeatureStore, create_store  # noqa: E402
from xmei.classification import classification_report, joint_report  # noqa: E402
from xmei.evaluate import CLIP_SCORES, write_predictions  # noqa: E402
from xmei.model import LQFormers  # noqa: E402
from xmei.report import ASSETS, build_report  # noqa: E402

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"]


def repeated_store(source: FeatureStore, path: Path, n: int) -> list[str]:
    """A store of ``n`` clips, clip i a copy of the source's clip i % len(source), renamed ID~k;
    returns the new video_ids."""
    attrs = source.attrs
    ids = [str(v) for v in source.read_whole("video_id")]
    pick = np.arange(n) % len(ids)
    video_ids = [f"{ids[j]}~{i // len(ids)}" for i, j in enumerate(pick)]
    texts = {name: [str(v) for v in source.read_whole(name)[pick]] for name in attrs["texts"]}
    texts["video_id"] = video_ids
    ints = {name: source.read_whole(name)[pick] for name in attrs["ints"]}
    features = {name: FeatureSpec(tuple(spec["shape"]), spec["dtype"]) for name, spec in attrs["features"].items()}
    kept = {k: attrs[k] for k in ("split", "annotations", "encoders", "preprocess", "extract", "labels")}
    store = create_store(path, n, int(attrs["shard_size"]), features, texts, ints, kept)
    whole = {name: source.read_whole(name) for name in features}
    for shard in range(store.num_shards):
        rows = pick[store.shard_range(shard).start:store.shard_range(shard).stop]
        store.write_shard(shard, {name: whole[name][rows] for name in features}, np.full(len(rows), OK, np.uint8), [])
    return video_ids


def repeated_evaluation(source: Path, folder: Path, video_ids: list[str]) -> list[dict]:
    """predictions.jsonl, results.json (classification rescored) and clip_scores.jsonl of the repeated clips."""
    by_id = {r["video_id"]: r for r in map(json.loads, (source / "predictions.jsonl").read_text().splitlines())}
    rows = [{**by_id[v.split("~")[0]], "video_id": v} for v in video_ids]
    results = json.loads((source / "results.json").read_text())
    flags = {}
    for kind in ("emotion", "intent"):
        labels = results[kind]["labels"]
        results[kind] = classification_report([r[f"ref_{kind}"] for r in rows], [r[kind] for r in rows], labels)
        flags[kind] = [r[kind] == r[f"ref_{kind}"] for r in rows]
    results["joint"] = joint_report(results["emotion"], results["intent"], flags["emotion"], flags["intent"])
    results["count"] = len(rows)
    write_predictions(rows, folder / "predictions.jsonl")
    (folder / "results.json").write_text(json.dumps(results))
    if (source / CLIP_SCORES).is_file():  # each clip's explanation scores, repeated with it
        scores = {c["video_id"]: c for c in map(json.loads, (source / CLIP_SCORES).read_text().splitlines())}
        (folder / CLIP_SCORES).write_text("".join(json.dumps({**scores[v.split("~")[0]], "video_id": v}) + "\n"
                                                  for v in video_ids))
    return rows


def open_filtered(page: Path, fragment: str) -> tuple[float, int]:
    """Seconds for chromium to open ``page#fragment`` and print its DOM, and the cards left shown."""
    start = time.perf_counter()
    dom = subprocess.run([*CHROMIUM, page.resolve().as_uri() + fragment], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    seconds = time.perf_counter() - start
    return seconds, dom.count('<article class="card') - dom.count('<article class="card hidden')


def megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def measure(demo: Path, model: LQFormers, clips: int, tmp: Path) -> dict[str, float]:
    """Build the page of ``clips`` clips in ``tmp`` and open it filtered to the intent errors."""
    video_ids = repeated_store(FeatureStore(demo / "stores" / "test"), tmp / "store", clips)
    (tmp / "eval").mkdir()
    rows = repeated_evaluation(demo / "eval" / "a_v_t", tmp / "eval", video_ids)
    start = time.perf_counter()
    page = build_report(tmp / "eval", store=tmp / "store", media_root=demo / "data", model=model)
    built = time.perf_counter() - start
    seconds, shown = open_filtered(page, "#outcome=intent")
    intent_wrong = sum(r["intent"] != r["ref_intent"] and r["emotion"] == r["ref_emotion"] for r in rows)
    if shown != intent_wrong:
        sys.exit(f"chromium shows {shown} cards for #outcome=intent, the answers have {intent_wrong}")
    return {"page": page.stat().st_size / 1e6, "images": megabytes(tmp / "eval" / ASSETS),
            "files": len(list((tmp / "eval" / ASSETS).iterdir())), "built": built, "open": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--clips", type=int, default=2000)
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("bench/report.py opens the pages in chromium: apt-get install chromium (Debian's package)")
    runs = args.demo / "runs" / "avt" / "checkpoints"
    if not (args.demo / "eval" / "a_v_t" / "predictions.jsonl").is_file() or not runs.is_dir():
        sys.exit(f"{args.demo} holds no demo run: run `bash scripts/main.sh` (or xmei demo) first")
    model = LQFormers.from_checkpoint(sorted(runs.iterdir())[-1])
    small = len(FeatureStore(args.demo / "stores" / "test"))
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        base, large = measure(args.demo, model, small, Path(a)), measure(args.demo, model, args.clips, Path(b))
    print(f"{'':38}{small:>10}{args.clips:>10}  ratio")
    for key, title in (("page", "report.html MB"), ("images", f"{ASSETS}/ MB"), ("files", "images"),
                       ("built", "build s (frames, audio, attention)"), ("open", "chromium open + filter s")):
        print(f"{title:38}{base[key]:>10.1f}{large[key]:>10.1f}  {large[key] / base[key]:.2f}")


if __name__ == "__main__":
    main()
