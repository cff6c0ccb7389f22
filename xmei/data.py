"""Training samples from one or more feature stores.

:class:`StoreSamples` is a map-style dataset over the ok clips (failed ones are skipped): texts,
captions and labels are held in memory as numpy arrays (no Python object per clip, so forked
DataLoader workers share them), features are read from the shard files a whole batch at a time
(``__getitems__``, which a DataLoader calls with a batch; see :mod:`stores.reader`). The LLM
tokenizer (a :class:`~xmei.prompt.PromptBuilder`) runs where the samples are made: in DataLoader
workers.

No record ends a run. A sample too long for ``max_length`` is cut (see :mod:`xmei.prompt`), and
one that cannot be made at all keeps its place as its bare prompt with no target token (labels
all -100): it adds nothing to the loss, and a batch keeps its size, so every rank still takes
part in every step. Each training sample says so in its ``FLAGS`` (``position``, ``truncated``,
``skipped``), which collate stacks into (B,) tensors: they travel with the batch out of the
worker processes, and the trainer pops them before the forward to count and log them
(:meth:`StoreSamples.failure` tells why a skipped sample failed).

:class:`EpochSampler` fixes each epoch's order from (seed, epoch) alone: shards in a shuffled
order, clips shuffled within a buffer of ``shuffle_shards`` shards, so reads stay within a few
shard files at a time; O(N log N) in numpy (~0.3 s at a million clips). The order does not depend
on the number of workers, and a resumed run starts it at the sample where the killed one stopped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stores import OK, ClipReader, FeatureStore
from stores.location import Location
from xmei.errors import UserError
from xmei.preempt import held, quiet_worker
from xmei.prompt import IGNORE, PromptBuilder
from xmei.settings import FEATURES, MODALITIES, feature_facts, open_stores

__all__ = ["FLAGS", "EpochSampler", "PackedStrings", "StoreSamples", "dtype_warning", "feature_facts", "loader"]

CAPTIONS = ("video_caption_ids", "video_caption_mask", "audio_caption_ids", "audio_caption_mask")
TEXTS = ("video_id", "subtitle", "emotion", "intent", "explanation")
FLAGS = ("position", "truncated", "skipped")  # per training sample; not model inputs: popped before the forward


def dtype_warning(stores: Iterable[str | Path], trained_in: str | None = None) -> str | None:
    """A warning when ``stores`` (and the stores a checkpoint was trained on, computed in
    ``trained_in``) hold features that the encoders computed in different dtypes, else None.
    Stores that do not record their dtype (made by an earlier xmei) are not counted."""
    dtypes = {str(path): FeatureStore(path).attrs.get("compute_dtype") for path in stores}
    dtypes["the checkpoint's training stores"] = trained_in
    by_dtype: dict[str, list[str]] = {}
    for source, dtype in dtypes.items():
        if dtype:
            by_dtype.setdefault(dtype, []).append(source)
    if len(by_dtype) < 2:
        return None
    found = "; ".join(f"{dtype} in {', '.join(sources)}" for dtype, sources in sorted(by_dtype.items()))
    return (f"features computed by the encoders in different dtypes ({found}): the model sees slightly other "
            "features than it was trained on; extract every store with one extract.precision")


class PackedStrings:
    """Strings as two numpy arrays instead of one Python object each: string i is the UTF-8 bytes
    ``data[offsets[i]:offsets[i + 1]]``. Forked DataLoader workers share the pages of both
    (reading a Python object writes its reference count, which copies the page)."""

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode() for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, np.int64)  # (n + 1,)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), np.uint8).copy()  # (offsets[-1],) uint8

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


class StoreSamples(Dataset):
    """The ok clips of one or more stores, at positions 0 .. N-1 (store order, then clip order).

    Per position, numpy arrays only (no Python object per clip): ``store_ids``, ``clips`` (its
    store and clip), ``shard_ids`` (a shard number over all stores), ``has_audio``, ``captions``
    (name -> (N, caption_tokens) int32) and ``strings`` (text field -> :class:`PackedStrings`).
    Features are read with each store's :class:`~stores.ClipReader`, a batch at a time.
    """

    def __init__(self, paths: list[str | Path], builder: PromptBuilder | None = None,
                 modalities: Iterable[str] = MODALITIES, checked: list[FeatureStore] | None = None):
        """``builder`` turns texts into input_ids / labels; without it samples carry only features
        and texts (for generation). Only the features of ``modalities`` are read (a store may lack
        the others). ``checked``: the stores of ``paths`` as :func:`~xmei.settings.open_stores`
        returned them (the trainer checks its stores before it builds the model); else they are
        opened and checked here."""
        self.paths = [str(p) for p in paths]
        self.builder = builder
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        stores = checked if checked is not None else open_stores(self.paths, self.modalities)
        self.labels = stores[0].attrs["labels"]
        self.shard_size = [s.shard_size for s in stores]
        ok = [np.flatnonzero(s.status() == OK) for s in stores]  # per store: (n_k,) clip indexes
        self.store_ids = np.concatenate([np.full(len(c), k, np.int64) for k, c in enumerate(ok)])  # (N,)
        self.clips = np.concatenate(ok).astype(np.int64)  # (N,)
        first_shard = np.cumsum([0] + [s.num_shards for s in stores])[:-1]
        self.shard_ids = np.concatenate([first + c // s.shard_size for first, s, c in zip(first_shard, stores, ok)])
        self.has_audio = np.concatenate([s.clip_reader("has_audio").read(c) for s, c in zip(stores, ok)])  # (N,) uint8
        self.captions = {n: np.concatenate([s.read_whole(n)[c] for s, c in zip(stores, ok)])
                         for n in CAPTIONS if n.split("_")[0] in self.modalities}
        self.strings = {n: PackedStrings(str(v) for s, c in zip(stores, ok) for v in s.read_whole(n)[c])
                        for n in TEXTS}
        self._readers: dict[int, list[dict[str, ClipReader]]] = {}
        self.caption_dropout, self.seed, self.epoch = 0.0, 0, 0

    def hide_captions(self, p: float, seed: int) -> None:
        """Caption dropout: from now on each sample's description is hidden, per modality, with
        probability ``p`` (its caption mask zeroed, so the LQ-Former has only its learned
        queries), so that a clip without descriptions (`xmei predict` on a raw video) is not out
        of distribution. Which ones is a function of (seed, ``epoch``, position) alone: the same
        for any number of ranks or workers, and after a resume."""
        self.caption_dropout, self.seed = p, seed

    def __len__(self) -> int:
        return len(self.clips)

    def shard_of(self, position: int) -> tuple[int, int]:
        """(store, shard of that store) of a position."""
        store = int(self.store_ids[position])
        return store, int(self.clips[position]) // self.shard_size[store]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}  # a worker started by forkserver opens its own

    @property
    def remote(self) -> bool:
        """Whether a store is in object storage (its workers cannot be forked: stores.location)."""
        return any(Location.parse(p).remote for p in self.paths)

    def _open(self) -> list[dict[str, ClipReader]]:
        """Per store, the feature readers, made once per process (DataLoader workers make their own)."""
        pid = os.getpid()
        if pid not in self._readers:
            stores = [FeatureStore(p) for p in self.paths]
            self._readers = {pid: [{m: s.clip_reader(FEATURES[m]) for m in self.modalities} for s in stores]}
        return self._readers[pid]

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> list[dict]:
        positions = np.asarray(positions, np.int64)  # (B,)
        features = {m: self._read(m, positions) for m in self.modalities}  # modality -> B arrays
        return [self._sample(int(p), {"has_audio": self.has_audio[p], **{k: v[i] for k, v in features.items()}})
                for i, p in enumerate(positions)]

    def _read(self, modality: str, positions: np.ndarray) -> list[np.ndarray]:
        """The features of ``modality`` of each position (one array each), one read call per store."""
        readers, stores = self._open(), self.store_ids[positions]
        values: dict[int, np.ndarray] = {}  # row of the batch -> its clip's array
        for store in np.unique(stores):
            rows = np.flatnonzero(stores == store)
            values.update(zip(rows.tolist(), readers[store][modality].read_each(self.clips[positions[rows]])))
        return [values[row] for row in range(len(positions))]

    def _sample(self, position: int, features: dict) -> dict:
        """A sample from its features (the modalities', has_audio) and the texts held in memory."""
        sample = {m: features[m] for m in (*self.modalities, "has_audio")}
        sample.update({n: values[position] for n, values in self.captions.items()})
        if self.caption_dropout > 0:
            hidden = np.random.default_rng([self.seed, self.epoch, position]).random(2) < self.caption_dropout
            for m, hide in zip(MODALITIES, hidden):
                if hide and m in self.modalities:
                    sample[f"{m}_caption_mask"] = np.zeros_like(sample[f"{m}_caption_mask"])
        if self.builder is None:  # generation: the texts themselves
            sample["texts"] = {n: self.strings[n][position] for n in TEXTS}
            return sample
        try:
            encoded = self._encode(position)
            ids, labels, truncated, skipped = encoded.input_ids, encoded.labels, encoded.truncated, False
        except Exception:  # noqa: BLE001 - whatever one record does, the run goes on; the trainer reports it
            ids = self.builder.prompt("")
            labels, truncated, skipped = [IGNORE] * len(ids), False, True
        sample.update(input_ids=ids, labels=labels, position=np.int64(position), truncated=np.bool_(truncated),
                      skipped=np.bool_(skipped))
        return sample

    def failure(self, position: int) -> str:
        """Why the sample at ``position`` could not be made ("" if it can): it is made again here,
        in this process (skipped samples are few)."""
        try:
            self._encode(position)
        except Exception as e:  # noqa: BLE001 - as in _sample
            return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        return ""

    def _encode(self, position: int):
        """The training sample's prompt + target ids and labels (:meth:`PromptBuilder.encode`)."""
        texts = {n: self.strings[n][position] for n in ("subtitle", "emotion", "intent", "explanation")}
        return self.builder.encode(**texts)


class EpochSampler(Sampler[int]):
    """Dataset positions of one epoch (``samples`` of them, cycling through the data as often as
    needed), for one rank of ``world``; a pure function of (seed, epoch). ``dataset``: anything
    with ``len()`` and ``shard_ids`` ((N,) ints, the shard each position is read from)."""

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
        """Every position once: shards in a random order, cut into groups of ``shuffle_shards``
        shards; the groups in that order, the positions of a group in a random order. O(N log N)."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        shards, shard_of = np.unique(np.asarray(self.dataset.shard_ids), return_inverse=True)  # (S,), (N,)
        place = np.empty(len(shards), np.int64)  # place[s]: where shard s comes in the shuffled order
        place[rng.permutation(len(shards))] = np.arange(len(shards))
        group = place[shard_of] // self.buffer  # (N,)
        return np.lexsort((rng.random(len(group)), group))  # by group, then at random within it

    def __iter__(self):
        order = self.order(self.epoch)[self.start:]
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.samples - self.start, self.world))


def loader(data: Dataset, batch_sampler, collate_fn, num_workers: int = 0, pin_memory: bool = False,
           seed: int = 0) -> DataLoader:
    """The one DataLoader of training (and of the reader benchmark): whole batches of positions
    go to ``data.__getitems__``; its own generator, so making an iterator does not draw from the
    global RNG (exact resume). Workers are forked (the default): the store reader holds no threads
    and no open files, and the per-clip arrays are shared, not copied. Of stores in object storage
    they start by forkserver instead (a forked child of a process that used its client hangs:
    stores.location), each given a pickled copy of ``data``. Workers ignore SIGTERM and SIGINT (a
    terminal's Ctrl-C reaches them too): the main process decides (xmei.preempt)."""
    context = "forkserver" if num_workers and getattr(data, "remote", False) else None
    return _QuietLoader(data, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=quiet_worker, multiprocessing_context=context)


class _QuietLoader(DataLoader):
    """A DataLoader whose workers start with SIGTERM and SIGINT blocked, then ignore them."""

    def __iter__(self):
        with held():  # the workers start (fork) in here
            return super().__iter__()
