"""Training samples from one or more feature stores.

:class:`StoreSamples` is a map-style dataset over the ok clips (failed ones are skipped): texts,
captions and labels are held in memory, features are read from the stores, contiguous clips in
one slice (``__getitems__``, which a DataLoader calls with a whole batch). The LLM tokenizer
(a :class:`~xmei.prompt.PromptBuilder`) runs where the samples are made: in DataLoader workers.

:class:`EpochSampler` fixes each epoch's order from (seed, epoch) alone: shards in a shuffled
order, clips shuffled within a buffer of ``shuffle_shards`` shards, so reads stay within a few
shard files at a time. The order does not depend on the number of workers, and a resumed run
starts it at the sample where the killed one stopped.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stores import OK, FeatureStore
from xmei.prompt import PromptBuilder

__all__ = ["EpochSampler", "StoreSamples", "feature_facts", "loader"]

FEATURES = {"visual": "video", "audio": "audio"}  # store array -> batch key
PER_CLIP = ("has_audio",)
CAPTIONS = ("video_caption_ids", "video_caption_mask", "audio_caption_ids", "audio_caption_mask")
TEXTS = ("video_id", "subtitle", "emotion", "intent", "explanation")


def feature_facts(store: FeatureStore) -> dict[str, int]:
    """What the model needs to know about the features, from the store's attributes."""
    feats = store.attrs["features"]
    return {"visual_size": feats["visual"]["shape"][-1], "audio_size": feats["audio"]["shape"][-1],
            "num_frames": feats["visual"]["shape"][0], "num_audio_clips": feats["audio"]["shape"][0],
            "caption_tokens": store.attrs["extract"]["caption_tokens"]}


class StoreSamples(Dataset):
    def __init__(self, paths: list[str | Path], builder: PromptBuilder | None = None):
        """``builder`` turns texts into input_ids / labels; without it samples carry only features
        and texts (for generation)."""
        self.paths = [str(p) for p in paths]
        self.builder = builder
        stores = [FeatureStore(p) for p in self.paths]
        facts = [feature_facts(s) for s in stores]
        for path, f in zip(self.paths[1:], facts[1:]):
            if f != facts[0] or stores[0].attrs["encoders"] != FeatureStore(path).attrs["encoders"]:
                raise ValueError(f"{path}: features {f} from other encoders or settings than {self.paths[0]}")
        self.facts = facts[0]
        self.labels = stores[0].attrs["labels"]
        self.shard_size = [s.shard_size for s in stores]
        # (store, clip) of every ok clip, in store order
        self.items = [(k, int(i)) for k, s in enumerate(stores) for i in np.flatnonzero(s.status() == OK)]
        self.memory = [{n: s.array(n)[...] for n in (*CAPTIONS, *TEXTS)} for s in stores]
        self._stores: dict[int, list[FeatureStore]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def shard_of(self, position: int) -> tuple[int, int]:
        store, clip = self.items[position]
        return store, clip // self.shard_size[store]

    def _open(self) -> list[FeatureStore]:
        """The stores, opened once per process (DataLoader workers open their own)."""
        pid = os.getpid()
        if pid not in self._stores:
            self._stores = {pid: [FeatureStore(p) for p in self.paths]}
        return self._stores[pid]

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> list[dict]:
        stores = self._open()
        # read runs of consecutive clips of one store in one slice each
        wanted = sorted(set(self.items[p] for p in positions))
        rows: dict[tuple[int, int], dict] = {}
        start = 0
        while start < len(wanted):
            end = start
            while end + 1 < len(wanted) and wanted[end + 1] == (wanted[end][0], wanted[end][1] + 1):
                end += 1
            store, first = wanted[start]
            block = slice(first, wanted[end][1] + 1)
            arrays = {n: stores[store].array(n)[block] for n in (*FEATURES, *PER_CLIP)}
            for j in range(block.stop - block.start):
                rows[(store, first + j)] = {n: a[j] for n, a in arrays.items()}
            start = end + 1
        return [self._sample(self.items[p], rows[self.items[p]]) for p in positions]

    def _sample(self, item: tuple[int, int], features: dict) -> dict:
        store, clip = item
        memory = self.memory[store]
        sample = {FEATURES[n]: features[n] for n in FEATURES}
        sample["has_audio"] = features["has_audio"]
        sample.update({n: memory[n][clip] for n in CAPTIONS})
        texts = {n: str(memory[n][clip]) for n in TEXTS}
        if self.builder is not None:
            encoded = self.builder.encode(texts["subtitle"], texts["emotion"], texts["intent"], texts["explanation"])
            sample["input_ids"], sample["labels"] = encoded.input_ids, encoded.labels
        else:
            sample["texts"] = texts
        return sample


class EpochSampler(Sampler[int]):
    """Dataset positions of one epoch (``samples`` of them, cycling through the data as often as
    needed), for one rank of ``world``; a pure function of (seed, epoch)."""

    def __init__(self, dataset: StoreSamples, seed: int, shuffle_shards: int = 4, samples: int | None = None,
                 shuffle: bool = True, rank: int = 0, world: int = 1):
        self.dataset, self.seed, self.buffer, self.shuffle = dataset, seed, shuffle_shards, shuffle
        self.samples = len(dataset) if samples is None else samples
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start epoch ``epoch`` after its first ``start`` samples (of all ranks together)."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> np.ndarray:
        """All positions of the epoch, every rank's, in order."""
        rounds, total = [], 0
        while total < self.samples:
            rounds.append(self._one_pass(np.random.default_rng([self.seed, epoch, len(rounds)])))
            total += len(rounds[-1])
        return np.concatenate(rounds)[: self.samples]

    def _one_pass(self, rng: np.random.Generator) -> np.ndarray:
        positions = np.arange(len(self.dataset))
        if not self.shuffle:
            return positions
        shard_of = np.array([self.dataset.shard_of(int(p)) for p in positions]).reshape(-1, 2)
        shards = np.unique(shard_of, axis=0)
        shards = shards[rng.permutation(len(shards))]
        out = []
        for k in range(0, len(shards), self.buffer):
            group = shards[k:k + self.buffer]
            members = positions[(shard_of[:, None, :] == group[None, :, :]).all(-1).any(-1)]
            out.append(rng.permutation(members))
        return np.concatenate(out)

    def __iter__(self):
        order = self.order(self.epoch)[self.start:]
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.samples - self.start, self.world))


def loader(data: Dataset, batch_sampler, collate_fn, num_workers: int = 0, pin_memory: bool = False,
           seed: int = 0) -> DataLoader:
    """The one DataLoader of training (and of the reader benchmark): whole batches of positions
    go to ``data.__getitems__``; its own generator, so making an iterator does not draw from the
    global RNG (exact resume)."""
    return DataLoader(data, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
