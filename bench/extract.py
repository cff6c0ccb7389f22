"""Benchmark of stage 1 (feature extraction): where the time goes, as ratios from one run.

Builds its own inputs (a synthetic corpus and the tiny models), then measures on the same
train clips, in one process, each after one warm-up clip (excluded from the timing):

- decode only: read_frames + read_audio + audio_windows + the checkpoint processors, one thread;
- encode only: encode_frames + encode_audio on the prepared tensors, batched like extract();
- whole pipeline: pipeline.extract.extract(workers=0) into a fresh store (decode threads
  overlapping the encoders), and with a dask LocalCluster of 2 workers (cluster start-up and
  the workers' model loading included: they cannot be warmed up);
- decord sampled reads (what read_frames does) against PyAV decoding every frame.

Prints clips/s per stage, their ratios, and one computed line of interpretation.

Run:  .venv/bin/python bench/extract.py [--clips 48] [--out DIR]
(--out keeps the corpus, models and stores; by default a temporary folder is removed.)
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # dask workers inherit it (spawned with the parent's sys.path)

import numpy as np

from pipeline.annotations import read_annotations, write_annotations
from pipeline.decode import audio_windows, frame_indices, read_audio, read_frames
from pipeline.encoders import Encoders, EncoderSettings


def build_inputs(folder: Path, clips: int):
    """Tiny models, a corpus with at least clips + 1 train clips, the config, and the records."""
    from pipeline.synth import SPLITS, synth_corpus
    from pipeline.tiny_models import build_tiny_models
    from xmei.config import load_config

    models = folder / "models"
    if not (models / "tiny_models.json").is_file():
        build_tiny_models(models, seed=0)
    cfg = load_config(REPO / "configs" / "tiny.yaml", models_dir=models)
    corpus = folder / "corpus"
    n = math.ceil((clips + 1) / dict(SPLITS)["train"]) + 1  # the train split is a fixed share
    train_file = corpus / "annotations" / "train.json"
    if not train_file.is_file() or len(read_annotations(train_file, cfg.emotions, cfg.intents)) < clips + 1:
        synth_corpus(corpus, n, 0, cfg.emotions, cfg.intents, overwrite=True)
    records = read_annotations(train_file, cfg.emotions, cfg.intents)
    warm, measured = records[clips], records[:clips]  # the warm-up clip is not a measured one
    write_annotations(folder / "bench_warmup.json", [warm])
    write_annotations(folder / "bench_clips.json", measured)
    return cfg, corpus, warm, measured


def timed(fn):
    """(fn()'s result, wall seconds, this process's CPU seconds / wall seconds: cores busy)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu / wall


def prepare(enc: Encoders, record, root: Path) -> dict:
    """What extract_shard's decode threads do for one clip."""
    s, video, audio = enc.settings, record.video_file(root), record.audio_file(root)
    pixels = enc.preprocess_frames(read_frames(video, s.num_frames))
    wave = read_audio(audio, video)
    if wave is None:
        return {"pixels": pixels, "audio": None}
    windows, lengths = audio_windows(wave, s.num_audio_clips, s.audio_clip_seconds)
    return {"pixels": pixels, "audio": enc.preprocess_audio(windows, lengths)}


def bench_decode(enc: Encoders, root: Path, warm, records):
    """Everything before the encoders, one clip after another: (prepared clips, wall, cores)."""
    prepare(enc, warm, root)
    return timed(lambda: [prepare(enc, r, root) for r in records])


def encode(enc: Encoders, batch: list[dict]) -> None:
    import torch

    enc.encode_frames(torch.cat([p["pixels"] for p in batch]))
    heard = [p["audio"] for p in batch if p["audio"] is not None]
    if heard:
        enc.encode_audio(torch.cat([a[0] for a in heard]), torch.cat([a[1] for a in heard]))


def bench_encode(enc: Encoders, prepared: list[dict]):
    """The prepared clips through the encoders in batches of extract.batch_size: (wall, cores)."""
    encode(enc, prepared[:1])
    size = enc.settings.batch_size
    _, wall, cores = timed(lambda: [encode(enc, prepared[i:i + size]) for i in range(0, len(prepared), size)])
    return wall, cores


def bench_pipeline(cfg, folder: Path, corpus: Path, workers: int):
    """extract() into a fresh store: (shard count, wall, cores of this process). workers=0 is
    warmed up on one clip first (loads the encoders into this process); a cluster cannot be."""
    from pipeline.extract import extract

    stores = folder / "stores"
    if workers == 0:
        shutil.rmtree(stores / "warmup", ignore_errors=True)
        extract(cfg, folder / "bench_warmup.json", corpus, stores / "warmup", workers=0)
    out = stores / f"workers{workers}"
    shutil.rmtree(out, ignore_errors=True)
    summary, wall, cores = timed(lambda: extract(cfg, folder / "bench_clips.json", corpus, out, workers=workers))
    if summary.ok != summary.clips:
        raise SystemExit(f"extract() failed clips: {summary.failed}")
    return summary.shards, wall, cores


def decord_sampled(video: Path, n: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(video), num_threads=1)  # as read_frames opens it
    return reader.get_batch(frame_indices(len(reader), n).tolist()).asnumpy()


def pyav_decode_all(video: Path, n: int) -> np.ndarray:
    import av

    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([frames[i] for i in frame_indices(len(frames), n)])


def bench_reader(read, root: Path, warm, records, n: int):
    """One reader over every video: (wall, cores)."""
    read(warm.video_file(root), n)
    _, wall, cores = timed(lambda: [read(r.video_file(root), n) for r in records])
    return wall, cores


def report(clips: int, cfg, shards: int, load: float, stages: dict[str, tuple[float, float | None]]) -> None:
    """stages: name -> (clips/s, cores busy in this process or None)."""
    import torch

    print(f"\ncores {os.cpu_count()}, torch threads {torch.get_num_threads()}, clips {clips} "
          f"(batch_size {cfg.extract.batch_size}, shard_size {cfg.extract.shard_size}: {shards} shard(s)); "
          f"load average {load:.2f} at start (other processes skew every number)")
    rate = {name: value for name, (value, _) in stages.items()}
    p = rate["pipeline, in-process"]
    ratios = {
        "pipeline / decode-only": p / rate["decode only"],
        "pipeline / encode-only": p / rate["encode only"],
        "decode-only / encode-only": rate["decode only"] / rate["encode only"],
        "decord-sampled / pyav-decode-all": rate["decord sampled reads"] / rate["pyav decode-all"],
        "LocalCluster-2 / in-process": rate["pipeline, LocalCluster 2 (incl. start-up)"] / p,
    }
    rows = [(name, f"{value:.2f}", "clips/s", "-" if cores is None else f"{cores:.2f}")
            for name, (value, cores) in stages.items()]
    rows += [(name, f"{value:.2f}", "x", "") for name, value in ratios.items()]
    width, digits = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'stage / ratio':<{width}}  {'value':>{digits}}          cpu/wall")
    for i, (name, value, unit, cores) in enumerate(rows):
        if i == len(stages):
            print("-" * (width + digits + 20))
        print(f"{name:<{width}}  {value:>{digits}} {unit:<8} {cores:>8}")
    (d, d_cores), (e, e_cores) = stages["decode only"], stages["encode only"]
    slower = "decode" if d < e else "encode"
    serial = 1 / (1 / d + 1 / e)  # no overlap at all: decode then encode, clip after clip
    cpu_bound = os.cpu_count() / (d_cores / d + e_cores / e)  # all cores busy with both stages' CPU seconds
    print(f"=> the pipeline runs at {100 * p / min(d, e):.0f}% of the slower of decode and encode "
          f"({slower}, {min(d, e):.2f} clips/s), {100 * p / serial:.0f}% of a fully serial decode-then-encode "
          f"({serial:.2f}) and {100 * p / cpu_bound:.0f}% of what {os.cpu_count()} cores allow for both "
          f"stages' CPU time ({cpu_bound:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48, help="train clips to measure (default 48)")
    parser.add_argument("--out", type=Path, help="keep inputs and stores here (default: a temp folder)")
    args = parser.parse_args()
    began, load = time.perf_counter(), os.getloadavg()[0]
    folder = (args.out or Path(tempfile.mkdtemp(prefix="xmei-bench-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cfg, corpus, warm, records = build_inputs(folder, args.clips)
        print(f"inputs ready in {time.perf_counter() - began:.1f} s ({folder})", flush=True)
        enc = Encoders(EncoderSettings.from_config(cfg))
        n, frames = len(records), cfg.extract.num_frames
        stages: dict[str, tuple[float, float | None]] = {}
        prepared, wall, cores = bench_decode(enc, corpus, warm, records)
        stages["decode only"] = n / wall, cores
        wall, cores = bench_encode(enc, prepared)
        stages["encode only"] = n / wall, cores
        del prepared
        shards, wall, cores = bench_pipeline(cfg, folder, corpus, workers=0)
        stages["pipeline, in-process"] = n / wall, cores
        _, wall, _ = bench_pipeline(cfg, folder, corpus, workers=2)
        stages["pipeline, LocalCluster 2 (incl. start-up)"] = n / wall, None  # the work is in other processes
        wall, cores = bench_reader(decord_sampled, corpus, warm, records, frames)
        stages["decord sampled reads"] = n / wall, cores
        wall, cores = bench_reader(pyav_decode_all, corpus, warm, records, frames)
        stages["pyav decode-all"] = n / wall, cores
        report(n, cfg, shards, load, stages)
    finally:
        if args.out is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"total run time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
