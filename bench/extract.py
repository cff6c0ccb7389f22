"""Benchmark of stage 1 (feature extraction): where the time goes, as ratios from one run.

Builds its own inputs (the tiny models, a synthetic corpus, camera-like clips) and measures, in
one run, each after a warm-up that is not timed:

small clips (the synthetic corpus: 1-6 s, up to 256x192; the tiny encoders dominate)
- decode only: pipeline.decode_pool with 1 process (decode, resize/crop, audio windows);
- encode only: Encoders.encode on the prepared clips, batched like extract();
- the pipeline: extract(workers=0) into a fresh store (its decode pool overlapping the
  encoders), and on a dask LocalCluster of 2 workers (start-up and model loading included);
- decord sampled reads (what read_frames does) against PyAV decoding every frame.

camera-like clips (1080p and 720p H.264 + AAC, 5-15 s: decoding dominates, as on a GPU farm)
- decode + preprocess clips/s with 1 and with 2 decode processes (goal: 2 processes >= 1.8x on
  2 cores), and the decode seconds of one core per clip (1080p and 720p apart);
- the pipeline with its decode pool against the ideal for this machine: cores / (decode seconds
  + encode CPU seconds per clip) (goal >= 0.8).

Last it prints how many decode processes a GPU needs, from the decode seconds per camera clip
and a GPU encode rate: --gpu-clips-per-s, by default an estimate from FLOPs (not measured).

Run:  .venv/bin/python bench/extract.py [--clips 48] [--camera 8] [--rounds 4] [--out DIR]
(--out keeps the corpus, models, camera clips and stores; by default a temporary folder is removed.)
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
from pipeline.decode import frame_indices
from pipeline.decode_pool import Clip, DecodePool, Failure, Prepared, available_cores
from pipeline.encoders import Encoders, EncoderSettings
from pipeline.synth import CAMERA, CAMERA_SECONDS, camera_corpus
from xmei.config import load_config

# ViT-L/14 at 224 (~81 GFLOPs a frame, 8 frames) + HuBERT-Large on 8 windows of 2 s (~0.6 TFLOPs),
# at ~40% of an H100's ~990 dense bf16 TFLOP/s: an estimate to size the decode pool, not a measurement
GPU_CLIPS_PER_S_ESTIMATE = 0.4 * 990e12 / (8 * 81e9 + 0.6e12)
CAMERA_BATCH = 4


def build_inputs(folder: Path, clips: int):
    """Tiny models, a corpus with at least clips + 1 train clips, the config, and the records."""
    from pipeline.synth import SPLITS, synth_corpus
    from pipeline.tiny_models import build_tiny_models
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
    return cfg, corpus, records[clips], records[:clips]  # the warm-up clip is not a measured one


def timed(fn):
    """(fn()'s result, wall seconds, this process's CPU seconds / wall seconds: cores busy)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu / wall


def clips_of(enc: Encoders, records, root: Path) -> list[Clip]:
    return [Clip(str(r.video_file(root)), str(r.audio_file(root) or ""), enc.preparation) for r in records]


def bench_decode(clips: list[Clip], warm: Clip, processes: int) -> tuple[list[Prepared], float]:
    """Decode + preprocess in a pool of ``processes``: (prepared clips, wall seconds). Every
    process decodes the warm-up clip first (imports, codec set-up), untimed."""
    pool = DecodePool(processes)
    try:
        list(pool.map([warm] * processes, ahead=processes))
        results, wall, _ = timed(lambda: [r for _, r in pool.map(clips, ahead=2 * processes)])
    finally:
        pool.close()
    failed = [(c.video, r.reason) for c, r in zip(clips, results) if isinstance(r, Failure)]
    if failed:
        raise SystemExit(f"clips failed to decode: {failed}")
    return results, wall


def bench_encode(enc: Encoders, prepared: list[Prepared]) -> tuple[float, float]:
    """The prepared clips through the encoders in batches of extract.batch_size: (wall, CPU seconds)."""
    enc.encode(prepared[:1])
    size = enc.settings.batch_size
    _, wall, cores = timed(lambda: [enc.encode(prepared[i:i + size]) for i in range(0, len(prepared), size)])
    return wall, wall * cores


def bench_pipeline(cfg, folder: Path, root: Path, name: str, warm, records, workers: int):
    """extract() of ``records`` into a fresh store: (shard count, wall, cores of this process).
    workers=0 is warmed up on one clip first (the encoders and decode pool of this process); a
    cluster cannot be."""
    from pipeline.extract import extract

    stores = folder / "stores"
    write_annotations(folder / f"{name}_warmup.json", [warm])
    write_annotations(folder / f"{name}.json", records)
    if workers == 0:
        shutil.rmtree(stores / f"{name}_warmup", ignore_errors=True)
        extract(cfg, folder / f"{name}_warmup.json", root, stores / f"{name}_warmup", workers=0)
    out = stores / f"{name}_workers{workers}"
    shutil.rmtree(out, ignore_errors=True)
    summary, wall, cores = timed(lambda: extract(cfg, folder / f"{name}.json", root, out, workers=workers))
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


def bench_reader(read, root: Path, warm, records, n: int) -> float:
    """One reader over every video: wall seconds."""
    read(warm.video_file(root), n)
    _, wall, _ = timed(lambda: [read(r.video_file(root), n) for r in records])
    return wall


def table(rows: list[tuple[str, str, str]]) -> None:
    width, digits = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>{digits}} {unit}")


def goal(value: float, target: float) -> str:
    return f"(goal >= {target}: {'met' if value >= target else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48, help="small train clips to measure (default 48)")
    parser.add_argument("--camera", type=int, default=8, help="camera-like files to write (default 8)")
    parser.add_argument("--rounds", type=int, default=4, help="clips per camera-like file (default 4)")
    parser.add_argument("--gpu-clips-per-s", type=float, default=GPU_CLIPS_PER_S_ESTIMATE,
                        help="clips/s one GPU encodes with full-size encoders (default: an estimate from FLOPs, "
                             f"{GPU_CLIPS_PER_S_ESTIMATE:.0f})")
    parser.add_argument("--out", type=Path, help="keep inputs and stores here (default: a temp folder)")
    args = parser.parse_args()
    began, load = time.perf_counter(), os.getloadavg()[0]
    folder = (args.out or Path(tempfile.mkdtemp(prefix="xmei-bench-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cores = available_cores()
    try:
        cfg, corpus, warm, records = build_inputs(folder, args.clips)
        camera_warm, camera = camera_corpus(folder / "camera", args.camera, args.rounds)
        print(f"inputs ready in {time.perf_counter() - began:.1f} s ({folder})", flush=True)
        enc = Encoders(EncoderSettings.from_config(cfg))
        frames, n, m = cfg.extract.num_frames, len(records), len(camera)

        # small clips
        small = clips_of(enc, records, corpus)
        prepared, decode_wall = bench_decode(small, clips_of(enc, [warm], corpus)[0], 1)
        encode_wall, _ = bench_encode(enc, prepared)
        del prepared
        shards, pipe_wall, _ = bench_pipeline(cfg, folder, corpus, "small", warm, records, workers=0)
        _, cluster_wall, _ = bench_pipeline(cfg, folder, corpus, "small", warm, records, workers=2)
        decord_wall = bench_reader(decord_sampled, corpus, warm, records, frames)
        pyav_wall = bench_reader(pyav_decode_all, corpus, warm, records, frames)

        # camera-like clips
        root = folder / "camera"
        cam, cam_warm = clips_of(enc, camera, root), clips_of(enc, [camera_warm], root)[0]
        prepared, one_wall = bench_decode(cam, cam_warm, 1)
        _, two_wall = bench_decode(cam, cam_warm, 2)
        _, cam_encode_cpu = bench_encode(enc, prepared)
        del prepared
        # small batches: with a few dozen clips, batches of 16 would leave little to overlap
        small_batches = load_config(REPO / "configs" / "tiny.yaml", [f"extract.batch_size={CAMERA_BATCH}"],
                                    models_dir=folder / "models")
        _, cam_pipe_wall, _ = bench_pipeline(small_batches, folder, root, "camera", camera_warm, camera, workers=0)
        per_res = {}
        for height in sorted({h for _, h, _, _ in CAMERA}, reverse=True):
            chosen = [c for c in cam[:args.camera] if f"_{height}p_" in c.video]
            _, wall = bench_decode(chosen, cam_warm, 1)
            per_res[height] = wall / len(chosen)
    finally:
        if args.out is None:
            shutil.rmtree(folder, ignore_errors=True)

    import torch

    print(f"\ncores {cores}, torch threads {torch.get_num_threads()}, load average {load:.2f} at start "
          f"(other processes skew every number); extract.batch_size {cfg.extract.batch_size}")
    print(f"\nsmall clips: {n} synthetic train clips, {shards} shard(s)")
    rate = {"decode": n / decode_wall, "encode": n / encode_wall, "pipe": n / pipe_wall}
    table([("decode + preprocess, 1 decode process", f"{rate['decode']:.2f}", "clips/s"),
           ("encode only (tiny CLIP + HuBERT, batched)", f"{rate['encode']:.2f}", "clips/s"),
           (f"pipeline, in-process ({cores} decode processes)", f"{rate['pipe']:.2f}", "clips/s"),
           ("pipeline, LocalCluster 2 (start-up included)", f"{n / cluster_wall:.2f}", "clips/s"),
           ("decord sampled reads", f"{n / decord_wall:.2f}", "clips/s"),
           ("pyav decode-all", f"{n / pyav_wall:.2f}", "clips/s"),
           ("pipeline / encode-only", f"{rate['pipe'] / rate['encode']:.2f}", "x"),
           ("decord-sampled / pyav-decode-all", f"{pyav_wall / decord_wall:.2f}", "x")])

    decode_s, encode_s = one_wall / m, cam_encode_cpu / m
    ideal = cores / (decode_s + encode_s)  # every core busy with one of the two stages' CPU seconds
    speedup, pipe = one_wall / two_wall, m / cam_pipe_wall
    print(f"\ncamera-like clips: {m} ({args.rounds} of each of {args.camera} files: "
          f"{', '.join(f'{w}x{h} {fps} fps' for w, h, fps, _ in CAMERA)}; {'/'.join(f'{s:.0f}' for s in CAMERA_SECONDS)} "
          f"s; H.264 + AAC); the pipeline with extract.batch_size {CAMERA_BATCH}")
    table([("decode + preprocess, 1 decode process", f"{m / one_wall:.2f}", "clips/s"),
           ("decode + preprocess, 2 decode processes", f"{m / two_wall:.2f}", "clips/s"),
           *[(f"decode seconds of one core per {h}p clip", f"{s:.3f}", "s") for h, s in per_res.items()],
           ("decode seconds per clip, all", f"{decode_s:.3f}", "s"),
           ("encode CPU seconds per clip (tiny encoders)", f"{encode_s:.3f}", "s"),
           (f"pipeline, in-process ({cores} decode processes)", f"{pipe:.2f}", "clips/s"),
           (f"ideal for {cores} cores: cores / (decode + encode s)", f"{ideal:.2f}", "clips/s"),
           ("2 decode processes / 1", f"{speedup:.2f}", f"x {goal(speedup, 1.8)}"),
           ("pipeline / ideal", f"{pipe / ideal:.2f}", f"x {goal(pipe / ideal, 0.8)}")])
    need = args.gpu_clips_per_s * decode_s
    source = "an estimate from FLOPs, not measured" if args.gpu_clips_per_s == GPU_CLIPS_PER_S_ESTIMATE \
        else "given by --gpu-clips-per-s"
    print(f"\n=> a GPU encoding {args.gpu_clips_per_s:.0f} clips/s ({source}) needs {need:.0f} decode processes "
          f"busy at {decode_s:.3f} s per camera-like clip to stay busy: set extract.decode_workers to the cores "
          f"a worker has, and give each GPU worker as many cores as the node allows")
    print(f"total run time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
