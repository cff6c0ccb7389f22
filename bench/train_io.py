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
    in the loop (2 decode threads: a process pool would not change the tiny encoders' share): training
    without a feature cache.
    Each path is warmed up by one untimed forward + backward; loading the encoders is excluded.
(c) tokens per sample fed to the LLM: collate's per-batch padding over the epoch's batches,
    against the published fixed padding to 1024 tokens.
(d) real-size reads: --real-clips clips (256) of ViT-L/14 patch features, (8, 257, 1024) float16
    visual + (8, 1024) float16 audio (random values), in three layouts of the same bytes: a store
    written by create_store / write_shard (shards of 64, uncompressed) read by StoreSamples; one
    .npy file per clip and feature read with np.load (Emotion-LLaMA's and MERTools' layout); one raw
    file per clip read with one pread into a fresh array. Each goes through the training path:
    xmei.data.loader over EpochSampler batches of 16, the same collate (stack the features), page
    cache warm (one untimed pass each); the best of 5 interleaved passes is kept, by wall clock and,
    with num_workers=0, by this process's CPU time (steadier when other processes share the cores).
    ~1.1 GB of disk per layout, in a temporary folder removed at the end.
    And the same store in object storage: uploaded to an S3 endpoint on 127.0.0.1 (moto's server,
    its own process, objects in memory) and read by StoreSamples over its s3:// URL
    (stores.reader.ObjectClipReader: range requests, indexes kept, shards concurrently; DataLoader
    workers by forkserver), with the requests a batch of visual + audio costs, and the server's own
    rates, timed in the same run: every visual shard object read whole (one request each), and
    plain range requests of one clip each (48 clips), 1, 4 or 16 at a time (the best). The local
    server has no network latency, but moto answers a range request by copying the whole object
    (measured: ranges ~25 MB/s, whole objects ~500 MB/s here), so the URL row's wall clock is moto's;
    what speaks for the reader is its requests per batch, its rate against plain one-clip ranges,
    and its CPU time per clip in this process (moto runs in its own).
(e) EpochSampler.order() over 1M clip positions in shards of 64.

Run:  .venv/bin/python bench/train_io.py [--clips 64] [--out DIR] [--real-clips 256] [--workers 0 2] [--no-url]
      .venv/bin/python bench/train_io.py --real-size-only       (d) and (e) alone: a minute with --no-url,
                                                                  ~8 with the S3 row (moto serves ~25 MB/s here)
(--out keeps the corpus, models and stores; by default a temporary folder is removed.)
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
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
from torch.utils.data import BatchSampler, Dataset

from pipeline.annotations import read_annotations, write_annotations
from pipeline.decode_pool import Clip, Prepared, prepare
from pipeline.encoders import Encoders, EncoderSettings
from stores import OK, FeatureSpec, FeatureStore, create_store
from xmei.data import CAPTIONS, TEXTS, EpochSampler, StoreSamples, feature_facts, loader
from xmei.model import XMEIQwen, XMEISettings
from xmei.prompt import collate

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


def prepare_record(enc: Encoders, record, root: Path) -> Prepared:
    """Decode and preprocess one clip, as extract()'s decode processes do."""
    audio = record.audio_file(root)
    return prepare(Clip(str(record.video_file(root)), str(audio or ""), enc.preparation))


class EncodedBatches:
    """The same batches as the store path, their features computed from the media in the loop."""

    def __init__(self, data: StoreSamples, plan: list[list[int]], enc: Encoders, records, root: Path, pad_id: int):
        self.data, self.plan, self.enc, self.records, self.root, self.pad_id = data, plan, enc, records, root, pad_id
        self.pool = ThreadPoolExecutor(max_workers=2)

    def make(self, positions: list[int]) -> dict:
        clips = self.data.clips[positions]
        prepared = list(self.pool.map(lambda clip: prepare_record(self.enc, self.records[clip], self.root), clips))
        features = self.enc.encode(prepared)
        samples = [self.data._sample(p, {"video": features["visual"][i], "audio": features["audio"][i],
                                         "has_audio": features["has_audio"][i]})
                   for i, p in enumerate(positions)]
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
    builder = settings.prompt_builder(tokenizer)
    data, batch = StoreSamples([store_path], builder), cfg.run.batch_size_train
    if list(data.strings["video_id"]) != [r.video_id for r in records]:
        raise SystemExit("the store's clips are not the annotation records in order")
    steps = len(data) // batch
    plan = list(BatchSampler(EpochSampler(data, cfg.run.seed, cfg.run.shuffle_shards, steps * batch), batch, False))
    cached = loader(data, plan, partial(collate, pad_id=tokenizer.pad_token_id), cfg.run.num_workers, seed=cfg.run.seed)
    encoded = EncodedBatches(data, plan, Encoders(EncoderSettings.from_config(cfg)), records, corpus,
                             tokenizer.pad_token_id)
    walls, losses, seen = {"cached": [], "in_loop": []}, {}, None
    for _ in range(repeats):
        for name, batches in (("cached", cached), ("in_loop", encoded)):
            wall, step_losses, batches_seen = run_epoch(cfg, *new_model(cfg, settings), batches)
            walls[name].append(wall)
            losses.setdefault(name, step_losses)
            seen = seen or batches_seen
    encoded.pool.shutdown()
    gap = max(abs(a - b) for a, b in zip(losses["cached"], losses["in_loop"]))
    return {"steps": steps, "repeats": repeats, "seen": seen, "loss_gap": gap,
            **{name: min(w) for name, w in walls.items()}}


# --------------------------------------------------------------------------- (d) real-size reads

VISUAL, AUDIO = (8, 257, 1024), (8, 1024)  # ViT-L/14 patch tokens of 8 frames; 8 audio windows
REAL_SHARD, REAL_BATCH = 64, 16


def write_layouts(folder: Path, clips: int) -> dict[str, Path]:
    """The same random features as a store, as .npy files and as raw files; {layout: folder}."""
    store_path, npy, raw = folder / "store", folder / "npy", folder / "raw"
    for d in (npy / "visual", npy / "audio", raw):
        d.mkdir(parents=True)
    texts = {name: [f"{name} {i}" for i in range(clips)] for name in TEXTS}
    ints = {name: np.ones((clips, 32), np.int32) for name in CAPTIONS}
    attrs = {"encoders": {}, "labels": {"emotions": [], "intents": []}, "extract": {"caption_tokens": 32}}
    features = {"visual": FeatureSpec(VISUAL, "float16"), "audio": FeatureSpec(AUDIO, "float16"),
                "has_audio": FeatureSpec((), "uint8")}
    store = create_store(store_path, clips, REAL_SHARD, features, texts, ints, attrs)
    rng = np.random.default_rng(0)
    for shard in range(store.num_shards):
        rows = store.shard_range(shard)
        # uint16 below 0x3C00 are the float16 values in [0, 1): random, finite, never all zero
        visual = rng.integers(0, 0x3C00, (len(rows), *VISUAL), np.uint16).view(np.float16)  # (n, 8, 257, 1024)
        audio = rng.integers(0, 0x3C00, (len(rows), *AUDIO), np.uint16).view(np.float16)  # (n, 8, 1024)
        store.write_shard(shard, {"visual": visual, "audio": audio, "has_audio": np.ones(len(rows), np.uint8)},
                          np.full(len(rows), OK, np.uint8), [])
        for j, clip in enumerate(rows):
            np.save(npy / "visual" / f"{clip}.npy", visual[j])
            np.save(npy / "audio" / f"{clip}.npy", audio[j])
            (raw / f"{clip}.bin").write_bytes(visual[j].tobytes() + audio[j].tobytes())
    return {"store": store_path, "npy": npy, "raw": raw}


class NpyClips(Dataset):
    """One .npy file per clip and feature, read with np.load."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __getitems__(self, clips: list[int]) -> list[dict]:
        return [{"video": np.load(self.folder / "visual" / f"{c}.npy"),
                 "audio": np.load(self.folder / "audio" / f"{c}.npy")} for c in clips]


class PreadClips(Dataset):
    """One raw file per clip (visual bytes, then audio bytes), read with one pread into a fresh array."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.split = int(np.prod(VISUAL)) * 2  # bytes of the visual part

    def __getitems__(self, clips: list[int]) -> list[dict]:
        samples = []
        for c in clips:
            buffer = np.empty(self.split + int(np.prod(AUDIO)) * 2, np.uint8)
            fd = os.open(self.folder / f"{c}.bin", os.O_RDONLY)
            try:
                if os.preadv(fd, [buffer], 0) != len(buffer):
                    raise OSError(f"{self.folder / f'{c}.bin'}: short read")
            finally:
                os.close(fd)
            samples.append({"video": buffer[:self.split].view(np.float16).reshape(VISUAL),
                            "audio": buffer[self.split:].view(np.float16).reshape(AUDIO)})
        return samples


def stack_features(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The collate of every layout: stack the features into tensors with np.stack, as
    xmei.prompt.collate does (on CPU, torch.stack of float16 runs ~10x slower: see stack_seconds)."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in ("video", "audio")}


def stack_seconds(data: Dataset, positions: list[int]) -> dict[str, float]:
    """Seconds to stack one batch's features: np.stack (stack_features, collate) and torch.stack."""
    samples = data.__getitems__(positions)
    ways = {"np.stack": lambda: stack_features(samples),
            "torch.stack": lambda: [torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("video", "audio")]}
    return {name: best_of(way) for name, way in ways.items()}


URL_LAYOUT = "store in S3 (StoreSamples, s3:// URL)"


def serve_s3(store: Path):
    """An S3 endpoint on 127.0.0.1 (moto's server, a process of its own) holding ``store`` as
    s3://bench/store: (server process, URL, seconds of the upload)."""
    import socket

    import boto3

    from stores.location import use_endpoint
    from stores.store import copy_store

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
    use_endpoint(endpoint)  # this process and its DataLoader workers
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):  # the server starts
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    began = time.perf_counter()
    copy_store(store, "s3://bench/store")
    return server, "s3://bench/store", time.perf_counter() - began


def server_rates(where: str) -> dict[str, tuple[float, int]]:
    """What the server itself delivers, {way: (clips/s, requests in flight)}, the best of 1, 4 or 16
    at a time: every visual shard object read whole, one request each (the fewest, largest
    requests), and plain range requests of one visual clip each (the first 48; no index, no
    crc32c, no copy out)."""
    from concurrent.futures import ThreadPoolExecutor

    reader = FeatureStore(where).clip_reader("visual")
    files, size, per_shard = reader.files, reader.stored_bytes, reader.shard_size
    ways = {"whole shard objects": [(lambda key: files.read(key), reader.shard_key(k))
                                    for k in range(-(-reader.num_clips // per_shard))],
            "one-clip ranges": [(lambda key, at=i % per_shard * size: files.ranges(key, [at], [at + size]),
                                 reader.shard_key(i // per_shard)) for i in range(min(48, reader.num_clips))]}
    clips = {"whole shard objects": reader.num_clips, "one-clip ranges": min(48, reader.num_clips)}
    rates = {}
    for way, jobs in ways.items():
        best = (0.0, 0)
        for width in (1, 4, 16):
            with ThreadPoolExecutor(width) as pool:
                began = time.perf_counter()
                list(pool.map(lambda job: job[0](job[1]), jobs))
                best = max(best, (clips[way] / (time.perf_counter() - began), width))
        rates[way] = best
    return rates


def bench_real_size(folder: Path, clips: int, workers: list[int], repeats: int = 5, url: bool = True) -> dict:
    """(d): {(layout, workers): {"wall": clips/s, "cpu": clips per CPU second of this process}}, best
    of ``repeats`` interleaved passes after a warm-up pass each. CPU seconds count all the work only
    with num_workers=0; they do not grow when other processes share the cores, wall seconds do.
    With ``url``, the store read from an S3 endpoint too (module docstring)."""
    began = time.perf_counter()
    paths = write_layouts(folder, clips)
    os.sync()  # no write-back of the new files while reading them
    written = time.perf_counter() - began
    store = StoreSamples([paths["store"]])
    if not FeatureStore(paths["store"]).clip_reader("visual").direct:
        raise SystemExit("the store is read through Zarr: the direct path did not apply")
    sampler = EpochSampler(store, seed=42, shuffle_shards=4)
    if store.clips.tolist() != list(range(clips)):
        raise SystemExit("positions are not clips: the layouts would read different clips")
    plan = list(BatchSampler(sampler, REAL_BATCH, drop_last=False))  # positions = clip numbers here
    layouts = {"store (StoreSamples)": store, ".npy per clip and feature (np.load)": NpyClips(paths["npy"]),
               "raw per clip (one pread)": PreadClips(paths["raw"])}
    rates: dict[tuple[str, int], dict[str, float]] = {}
    server = uploaded = plain = requests = None  # requests: per batch, of the URL store's readers in this process
    try:
        if url:
            server, where, uploaded = serve_s3(paths["store"])
            layouts[URL_LAYOUT] = StoreSamples([where])
            plain = server_rates(where)
        for n in workers:
            requests = _passes(layouts, plan, n, repeats, clips, rates) or requests
    finally:
        if server is not None:
            server.kill()  # moto's server may outlive a SIGTERM
            server.wait()
    size = sum(f.stat().st_size for f in (paths["store"] / "visual").rglob("*") if f.is_file())
    return {"rates": rates, "written": written, "gb": size * 1e-9, "clips": clips, "repeats": repeats,
            "stack": stack_seconds(store, plan[0]), "uploaded": uploaded, "requests": requests, "plain": plain}


def _passes(layouts: dict, plan: list, n: int, repeats: int, clips: int, rates: dict) -> float | None:
    """The interleaved passes of every layout with num_workers ``n`` into ``rates``; the URL
    store's requests per batch when they were counted here (``n`` 0)."""
    loaders = {name: loader(data, plan, stack_features, num_workers=n) for name, data in layouts.items()}
    for batches in loaders.values():  # warm-up: page cache, worker start-up paths, allocator
        for _ in batches:
            pass
    for _ in range(repeats):
        for name, batches in loaders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in batches:
                pass
            best = rates.setdefault((name, n), {"wall": 0.0, "cpu": 0.0})
            best["wall"] = max(best["wall"], clips / (time.perf_counter() - wall))
            best["cpu"] = max(best["cpu"], clips / (time.process_time() - cpu))
    if n or URL_LAYOUT not in layouts:
        return None
    readers = layouts[URL_LAYOUT]._open()[0].values()  # this process's: warm-up + repeats passes
    return sum(r.requests for r in readers) / ((repeats + 1) * len(plan))


def time_order(positions: int = 1_000_000, shard_size: int = 64) -> float:
    """(e): seconds of EpochSampler.order() over ``positions`` positions in shards of ``shard_size``."""

    class Positions:  # what EpochSampler reads of a dataset
        shard_ids = np.arange(positions) // shard_size

        def __len__(self) -> int:
            return positions

    sampler = EpochSampler(Positions(), seed=0, shuffle_shards=4)
    start = time.perf_counter()
    sampler.order(0)
    return time.perf_counter() - start


def report_real_size(real: dict, order_seconds: float) -> None:
    rates, names = real["rates"], list(dict.fromkeys(name for name, _ in real["rates"]))
    print(f"\n(d) real-size reads: {real['clips']} clips of {VISUAL} + {AUDIO} float16 ({real['gb']:.2f} GB of "
          f"visual shards), EpochSampler order, batches of {REAL_BATCH} through xmei.data.loader, page cache warm, "
          f"best of {real['repeats']}; cores {os.cpu_count()}, 1-min load average {os.getloadavg()[0]:.2f} "
          f"(layouts written in {real['written']:.0f} s)")
    for n in sorted({w for _, w in rates}):
        for name in names:
            cpu = f"  {rates[(name, n)]['cpu']:6.0f} clips per CPU s" if n == 0 else ""
            print(f"    {name:<38} num_workers={n}  {rates[(name, n)]['wall']:6.0f} clips/s{cpu}")
        for clock in ("wall", "cpu") if n == 0 else ("wall",):
            store, npy, raw = (rates[(name, n)][clock] for name in names[:3])
            print(f"    => num_workers={n}, {clock:>4}: store / .npy = {store / npy:.2f}, store / raw pread = "
                  f"{store / raw:.2f}" + (f", store in S3 / store on disk = {rates[(URL_LAYOUT, n)][clock] / store:.2f}"
                                          if URL_LAYOUT in names else ""))
    if real["uploaded"] is not None:
        best = max(rate["wall"] for (name, _), rate in rates.items() if name == URL_LAYOUT)
        print(f"    the store in S3: uploaded in {real['uploaded']:.1f} s; {real['requests']:.1f} requests per batch of "
              f"{REAL_BATCH} (visual + audio: indexes once per shard, then one range request per run of clips "
              f"in a shard; num_workers=0)")
        for way, (rate, width) in real["plain"].items():
            print(f"    the server alone, {way} ({width} at a time, the best of 1, 4, 16): {rate:.0f} clips/s => "
                  f"store in S3 / that = {best / rate:.2f}")
    stack = real["stack"]
    print(f"    stacking one batch of {REAL_BATCH}: np.stack {stack['np.stack'] * 1e3:.0f} ms, torch.stack (what "
          f"collate did before) {stack['torch.stack'] * 1e3:.0f} ms = {REAL_BATCH / stack['torch.stack']:.0f} clips/s")
    print(f"(e) EpochSampler.order() over 1,000,000 positions in shards of 64: {order_seconds:.2f} s (goal < 2 s)")


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
    parser.add_argument("--real-clips", type=int, default=256, help="clips of the real-size reads (default 256)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers of the real-size reads (default 0 2)")
    parser.add_argument("--real-size-only", action="store_true", help="only (d) and (e): real-size reads, order()")
    parser.add_argument("--no-url", action="store_true", help="(d) without the store in S3 (moto on 127.0.0.1)")
    args = parser.parse_args()
    began, load = time.perf_counter(), os.getloadavg()[0]
    folder = (args.out or Path(tempfile.mkdtemp(prefix="xmei-bench-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    real_folder = Path(tempfile.mkdtemp(prefix="xmei-bench-real-"))  # ~3.3 GB: never kept (and ~1.1 GB of memory in S3)
    try:
        if not args.real_size_only:
            cfg, corpus, records, store = build_inputs(folder, args.clips)
            print(f"inputs ready in {time.perf_counter() - began:.1f} s ({folder})", flush=True)
            reads, size = bench_readers(cfg, store)
            epochs = bench_epochs(cfg, store, corpus, records)
            report(cfg, len(records), FeatureStore(store).num_shards, load, reads, size, epochs)
        real = bench_real_size(real_folder, args.real_clips, args.workers, url=not args.no_url)
        report_real_size(real, time_order())
    finally:
        shutil.rmtree(real_folder, ignore_errors=True)
        if args.out is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"total run time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
