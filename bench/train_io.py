"""Benchmark of stage 2's input side: what the feature cache buys, as ratios from one run.

Builds its own inputs (the tiny models, a synthetic corpus, one train store extracted with
extract(workers=0) and shard_size 16, so there are several shards), then measures in one process:

(a) reading every clip's features (the visual + audio arrays) through StoreSamples.__getitems__
    in batches of run.batch_size_train, in EpochSampler order (the training path) and in store
    order, and through FeatureStore.iter_shards(), against a plain sequential read of the same
    shard files (the ceiling). Each is warmed up once (the files sit in the page cache), then the
    best of 3 passes is kept. MB = the size of the visual + audio shard files, for every reader.
(b) one epoch of training steps (forward, backward, clip, AdamW; model in train mode, the same
    seed, batches and step count) fed from the store (DataLoader + StoreSamples + collate, as
    Trainer does) against fed by decoding each batch's media and running the frozen encoders
    in the loop (2 decode threads, as extract() uses): training without a feature cache.
    Each path is warmed up by one untimed forward + backward; loading the encoders is excluded.
(c) tokens per sample fed to the LLM: collate's per-batch padding over the epoch's batches,
    against the published fixed padding to 1024 tokens.

Run:  .venv/bin/python bench/train_io.py [--clips 64] [--out DIR]
(--out keeps the corpus, models and store; by default a temporary folder is removed.)
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from pipeline.annotations import read_annotations, write_annotations
from pipeline.decode import audio_windows, read_audio, read_frames
from pipeline.encoders import Encoders, EncoderSettings
from stores import FeatureStore
from xmei.data import EpochSampler, StoreSamples, feature_facts
from xmei.model import XMEIQwen, XMEISettings
from xmei.prompt import PromptBuilder, collate

PUBLISHED_PAD = 1024  # the published code pads every sample to max_length
FEATURES = ("visual", "audio")
REPEATS = 3


def build_inputs(folder: Path, clips: int):
    """Tiny models, a corpus with >= clips train clips, the config, the records and the store."""
    from pipeline.extract import extract
    from pipeline.synth import SPLITS, synth_corpus
    from pipeline.tiny_models import build_tiny_models
    from xmei.config import load_config

    models = folder / "models"
    if not (models / "tiny_models.json").is_file():
        build_tiny_models(models, seed=0)
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["extract.shard_size=16", "run.max_epoch=1"], models_dir=models)
    corpus, train = folder / "corpus", folder / "corpus" / "annotations" / "train.json"
    if not train.is_file() or len(read_annotations(train, cfg.emotions, cfg.intents)) < clips:
        synth_corpus(corpus, math.ceil(clips / dict(SPLITS)["train"]) + 1, 0, cfg.emotions, cfg.intents, overwrite=True)
    records = read_annotations(train, cfg.emotions, cfg.intents)[:clips]
    write_annotations(folder / "bench_clips.json", records)
    store = folder / "stores" / f"train{clips}"
    shutil.rmtree(store, ignore_errors=True)
    summary = extract(cfg, folder / "bench_clips.json", corpus, store, workers=0)
    if summary.ok != summary.clips:
        raise SystemExit(f"extract() failed clips: {summary.failed}")
    return cfg, corpus, records, store


def best_of(fn, repeats: int = REPEATS) -> float:
    """Wall seconds of the fastest of ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_readers(cfg, store_path: Path) -> tuple[dict[str, float], int]:
    """(a): {reader: wall seconds for every clip's features}, and the bytes they stand for."""
    store = FeatureStore(store_path)
    files = sorted(f for name in FEATURES for f in (store_path / name / "c").rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in files)
    data = StoreSamples([store_path])  # no builder: features and texts only, no tokenizing
    batch = cfg.run.batch_size_train

    def plain() -> None:
        for f in files:
            with open(f, "rb") as handle:
                handle.read()

    def shards() -> None:
        for _ in store.iter_shards():  # reads every array of each shard: features, status, texts, ints
            pass

    def samples(shuffle: bool) -> None:
        sampler = EpochSampler(data, cfg.run.seed, cfg.run.shuffle_shards, shuffle=shuffle)
        for positions in BatchSampler(sampler, batch, drop_last=False):
            data.__getitems__(positions)

    return {"plain read of the shard files (ceiling)": best_of(plain),
            "FeatureStore.iter_shards()": best_of(shards),
            "StoreSamples.__getitems__, EpochSampler order": best_of(partial(samples, True)),
            "StoreSamples.__getitems__, store order": best_of(partial(samples, False))}, size


def new_model(cfg, settings: XMEISettings):
    """The model (train mode) and its AdamW with Trainer's parameter groups, from the run seed."""
    torch.manual_seed(cfg.run.seed)
    model = XMEIQwen(settings).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, rest = [p for p in trainable if p.dim() >= 2], [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.run.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.run.init_lr)
    return model, optimizer, trainable


def run_epoch(cfg, model, optimizer, trainable, batches) -> tuple[float, list[float], list[dict]]:
    """Trainer._step per batch: (wall seconds incl. making the batches, losses, the batches)."""
    first = next(iter(batches))  # warm-up: one untimed forward + backward, no optimizer step
    model(first).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(cfg.run.seed)
    losses, seen, start = [], [], time.perf_counter()
    for batch in batches:
        loss = model(batch).loss
        loss.backward()
        if cfg.run.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.run.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen.append({k: batch[k] for k in ("input_ids", "attention_mask")})
    return time.perf_counter() - start, losses, seen


def prepare(enc: Encoders, record, root: Path) -> dict:
    """Decode and preprocess one clip, as extract()'s decode threads do."""
    s, video = enc.settings, record.video_file(root)
    pixels = enc.preprocess_frames(read_frames(video, s.num_frames))
    wave = read_audio(record.audio_file(root), video)
    if wave is None:
        return {"pixels": pixels, "audio": None}
    windows = audio_windows(wave, s.num_audio_clips, s.audio_clip_seconds)
    return {"pixels": pixels, "audio": enc.preprocess_audio(*windows)}


class EncodedBatches:
    """The same batches as the store path, their features computed from the media in the loop."""

    def __init__(self, data: StoreSamples, plan: list[list[int]], enc: Encoders, records, root: Path, pad_id: int):
        self.data, self.plan, self.enc, self.records, self.root, self.pad_id = data, plan, enc, records, root, pad_id
        self.pool = ThreadPoolExecutor(max_workers=2)

    def make(self, positions: list[int]) -> dict:
        items = [self.data.items[p] for p in positions]
        prepared = list(self.pool.map(lambda item: prepare(self.enc, self.records[item[1]], self.root), items))
        visual = self.enc.encode_frames(torch.cat([p["pixels"] for p in prepared]))
        audio = np.zeros((len(items), self.data.facts["num_audio_clips"], self.data.facts["audio_size"]), np.float16)
        has_audio = np.zeros(len(items), np.uint8)
        heard = [i for i, p in enumerate(prepared) if p["audio"] is not None]
        if heard:
            audio[heard] = self.enc.encode_audio(torch.cat([prepared[i]["audio"][0] for i in heard]),
                                                 torch.cat([prepared[i]["audio"][1] for i in heard]))
            has_audio[heard] = 1
        samples = [self.data._sample(item, {"visual": visual[i], "audio": audio[i], "has_audio": has_audio[i]})
                   for i, item in enumerate(items)]
        return collate(samples, self.pad_id)

    def __iter__(self):
        return (self.make(positions) for positions in self.plan)


def bench_epochs(cfg, store_path: Path, corpus: Path, records, repeats: int = 2) -> dict:
    """(b) and (c): each path's best epoch of ``repeats`` (interleaved, a fresh seeded model each),
    the per-step losses of the first pair, and the cached epoch's batches."""
    from transformers import AutoTokenizer

    facts = feature_facts(FeatureStore(store_path))
    vocab = len(AutoTokenizer.from_pretrained(str(cfg.model.caption_tokenizer_path)))
    settings = XMEISettings.from_config(cfg, caption_vocab_size=vocab, **facts)
    tokenizer = new_model(cfg, settings)[0].tokenizer  # with the placeholder tokens the model adds
    builder = PromptBuilder(tokenizer, settings.num_video_query_token, settings.num_audio_query_token,
                            settings.prompt_format, settings.max_length)
    data, batch = StoreSamples([store_path], builder), cfg.run.batch_size_train
    if [str(v) for v in data.memory[0]["video_id"]] != [r.video_id for r in records]:
        raise SystemExit("the store's clips are not the annotation records in order")
    steps = len(data) // batch
    plan = list(BatchSampler(EpochSampler(data, cfg.run.seed, cfg.run.shuffle_shards, steps * batch), batch, False))
    # as Trainer.loader: its own generator, so making an iterator does not draw from the global RNG
    loader = DataLoader(data, batch_sampler=plan, num_workers=cfg.run.num_workers,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(cfg.run.seed))
    encoded = EncodedBatches(data, plan, Encoders(EncoderSettings.from_config(cfg)), records, corpus,
                             tokenizer.pad_token_id)
    walls, losses, seen = {"cached": [], "in_loop": []}, {}, None
    for _ in range(repeats):
        for name, batches in (("cached", loader), ("in_loop", encoded)):
            wall, step_losses, batches_seen = run_epoch(cfg, *new_model(cfg, settings), batches)
            walls[name].append(wall)
            losses.setdefault(name, step_losses)
            seen = seen or batches_seen
    encoded.pool.shutdown()
    gap = max(abs(a - b) for a, b in zip(losses["cached"], losses["in_loop"]))
    return {"steps": steps, "repeats": repeats, "seen": seen, "loss_gap": gap,
            **{name: min(w) for name, w in walls.items()}}


def pct(fraction: float) -> str:
    return f"{100 * fraction:.2g}%"


def report(cfg, clips: int, shards: int, load: float, reads: dict[str, float], size: int, epochs: dict) -> None:
    run = cfg.run
    print(f"\ncores {os.cpu_count()}, torch threads {torch.get_num_threads()}, clips {clips} (shard_size "
          f"{cfg.extract.shard_size}: {shards} shards, {size / 1e6:.1f} MB of visual + audio; batch_size_train "
          f"{run.batch_size_train}, shuffle_shards {run.shuffle_shards}); 1-min load average {load:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} now (other processes skew every number)")
    ceiling = size / reads["plain read of the shard files (ceiling)"]
    rows = [(f"(a) {name}", f"{size / 1e6 / wall:.1f}", "MB/s", f"{clips / wall:.0f} clips/s",
             f"{size / wall / ceiling:.4f}") for name, wall in reads.items()]
    cached, in_loop, seen = epochs["cached"], epochs["in_loop"], epochs["seen"]
    steps = f"{epochs['steps']} steps, best of {epochs['repeats']}"
    rows += [("(b) epoch, cached features (StoreSamples)", f"{cached:.2f}", "s/epoch", steps, "1.00"),
             ("(b) epoch, encoders in the loop", f"{in_loop:.2f}", "s/epoch", steps, f"{in_loop / cached:.2f}")]
    samples = sum(b["input_ids"].shape[0] for b in seen)
    padded = sum(b["input_ids"].numel() for b in seen) / samples
    real = sum(int(b["attention_mask"].sum()) for b in seen) / samples
    rows += [("(c) tokens/sample, per-batch padding (collate)", f"{padded:.1f}", "tokens", f"{samples} samples",
              "1.00"),
             ("(c) tokens/sample, unpadded", f"{real:.1f}", "tokens", "", f"{real / padded:.3f}"),
             (f"(c) tokens/sample, fixed padding to {PUBLISHED_PAD}", f"{PUBLISHED_PAD}", "tokens", "",
              f"{PUBLISHED_PAD / padded:.2f}")]
    w = [max(len(r[i]) for r in [("measurement", "value", "unit", "", ""), *rows]) for i in range(4)]
    print(f"{'measurement':<{w[0]}}  {'value':>{w[1]}} {'unit':<{w[2]}}  {'':<{w[3]}}  ratio")
    for i, row in enumerate(rows):
        if i in (len(reads), len(reads) + 2):
            print("-" * (sum(w) + 14))
        print(f"{row[0]:<{w[0]}}  {row[1]:>{w[1]}} {row[2]:<{w[2]}}  {row[3]:<{w[3]}}  {row[4]}")
    print("ratio: (a) MB/s over the plain read (page cache); (b) seconds over the cached epoch; "
          "(c) tokens over per-batch padding")
    print(f"check: largest per-step loss difference between the two paths {epochs['loss_gap']:.1e} "
          "(same weights, batches and dropout; only the feature source differs)")
    train, by_shard = reads["StoreSamples.__getitems__, EpochSampler order"], reads["FeatureStore.iter_shards()"]
    print(f"=> the training reader delivers {pct(size / train / ceiling)} of the plain-read ceiling (iter_shards "
          f"{pct(size / by_shard / ceiling)}); reading an epoch's features in training order takes {train:.2f} s, "
          f"{pct(train / cached)} of a cached epoch; computing the features in the loop makes the epoch "
          f"{in_loop / cached:.2f}x as long (+{(in_loop - cached) / samples * 1e3:.0f} ms a sample); per-batch "
          f"padding feeds the LLM {PUBLISHED_PAD / padded:.1f}x fewer tokens than padding to {PUBLISHED_PAD}, "
          f"{pct(1 - real / padded)} of them padding")
    if max(load, os.getloadavg()[0]) >= (os.cpu_count() or 1):
        print(f"   (the load average reached the core count: other processes shared the {os.cpu_count()} cores, "
              "and (b) is the most sensitive to it; rerun on a quiet machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64, help="train clips to measure (default 64)")
    parser.add_argument("--out", type=Path, help="keep inputs and the store here (default: a temp folder)")
    args = parser.parse_args()
    began, load = time.perf_counter(), os.getloadavg()[0]
    folder = (args.out or Path(tempfile.mkdtemp(prefix="xmei-bench-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cfg, corpus, records, store = build_inputs(folder, args.clips)
        print(f"inputs ready in {time.perf_counter() - began:.1f} s ({folder})", flush=True)
        reads, size = bench_readers(cfg, store)
        epochs = bench_epochs(cfg, store, corpus, records)
        report(cfg, len(records), FeatureStore(store).num_shards, load, reads, size, epochs)
    finally:
        if args.out is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"total run time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
