"""Stage 2: train the LQ-Formers and the LoRA Qwen on cached features.

    trainer = Trainer(cfg, stores, val_store, output_dir, engine="torch", resume=False)
    trainer.setup(); trainer.train(); trainer.cleanup()

One loop, two engines, each in one process or many (``torchrun`` / ``deepspeed`` launchers or SLURM
tasks, any number of GPUs and nodes; gloo between CPU processes): ``torch`` (DistributedDataParallel
when there are several processes) and ``deepspeed`` (ZeRO-2; without a launcher it runs as rank 0
of 1). Both run one precision recipe (``run.precision``, see xmei.distributed): the model autocasts
its own forward and keeps its trainable weights fp32, so neither engine's mixed precision is used.
At start the ranks check that they share the output folder and read the same frozen weights,
which are therefore not broadcast.

A step: fetch the step's micro-batches -> count their target tokens over all ranks (and the ranks
that got a stop signal: see below) -> forward and
backward each, its loss the sum over its target tokens divided by that count (so every token of
the step weighs the same, whatever micro-batch or rank it is in) -> agree on the loss (a
non-finite loss on any rank stops every rank) -> clip -> optimizer step -> log -> checkpoint.
N processes with batch b therefore take the same steps as one process with batch N*b.

No record ends a run: a sample past ``model.max_length`` is cut (subtitle, then explanation; see
xmei.prompt), one that cannot be made stays in its batch without target tokens (xmei.data) and
is logged with its clip; each step's record counts both (``truncated``, ``skipped``, over all
ranks), and so does the validation's. ``strict``: a sample that cannot be made stops every rank
instead, naming the clip. A max_length too short for the labels of any (emotion, intent) pair is
refused at start-up.

A checkpoint holds the model checkpoint (safetensors + the adapter, or the whole LLM where it
trains whole, + config) and the trainer state (optimizer, scheduler, each rank's RNG, the data
position in samples, and the run's shape: processes x batch x accumulation), so ``resume``
continues exactly: the same per-step losses as an uninterrupted run. A resume with another shape
is refused, naming what changed, unless ``rebatch``: then it goes on from the same sample with the
schedule recomputed from the samples seen.

Signals (xmei.preempt), while :meth:`Trainer.train` runs: SIGTERM (what SLURM, Kubernetes and spot
instances send before a kill; ``torchrun`` forwards it to every worker) and SIGINT (Ctrl-C) stop a
run without losing its steps. Each step's first all-reduce also counts the ranks that got one, so
every rank stops at the same step even when one rank alone got it: the step in progress finishes,
the next one (whose data may be fetched) is not begun, and the run writes a checkpoint as a
scheduled one is written (``.partial``, renamed whole; none when no step was done since the last)
and ends with :attr:`Trainer.stopped` set; the CLI prints the ``--resume`` command and exits with
status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). At an epoch's end the ranks
agree once more, before the validation, so a stop never waits for it (a checkpoint written there
resumes into the validation). From the signal (or from the agreement, on a rank that got none)
``run.preempt_grace_s`` bounds it all: past it, or on a second signal, the process exits at once
with that status, naming the last whole checkpoint (a ``.partial`` one is never taken for whole).
A signal after the last epoch's agreement ends nothing: the run finishes as done. Before
:meth:`Trainer.train` (set-up, no step done) the signals keep their defaults. DataLoader workers
ignore both.

A full disk ends the run with a DiskFullError naming the filesystem, never a half checkpoint: at
start-up, when --output-dir cannot hold one checkpoint (the size of the last one there, else the
trainable weights and their optimizer state), and at each save, before anything is written; and
when the disk fills while a checkpoint or the log is written, the step_N.partial folder (or the log
line) removed. The earlier checkpoints are kept as they were, and --resume goes on from the newest.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from stores import FeatureStore
from xmei.checkpoint import (DAMAGED, CheckpointError, check_deepspeed, check_torch_file, checkpoints, loading,
                             verify_checkpoint)
from xmei.data import FLAGS, EpochSampler, StoreSamples, dtype_warning, loader
from xmei.distributed import (Distributed, frozen_names, resolve_precision, single_process_env, unbroadcast_frozen,
                              weights_checksum)
from xmei.errors import DiskFullError, UserError, byte_size, check_space, writing
from xmei.model import XMEIQwen, llm_tokenizer
from xmei.preempt import StopSignals
from xmei.prompt import IGNORE, collate
from xmei.schedule import linear_warmup_cosine_lr, resolve_warmup
from xmei.settings import XMEISettings, check_fit, check_store_labels, feature_facts, open_stores

__all__ = ["Stopped", "TrainError", "TrainWarning", "Trainer", "checkpoints"]

STATE_FILE = "trainer_state.pt"  # torch.save of tensors and plain values; loaded with weights_only=True
DEEPSPEED_DIR = "deepspeed"
# bytes a trainable parameter takes in a checkpoint: its fp32 weight and AdamW's two fp32 moments,
# and with DeepSpeed also the engine's copy of the weight and ZeRO's fp32 master copy
CHECKPOINT_BYTES = {"torch": 4 + 8, "deepspeed": 4 + 8 + 4 + 4}


class TrainError(UserError, RuntimeError):
    """A run that cannot start or cannot go on (bad inputs, NaN loss)."""


class TrainWarning(UserWarning):
    """A run that goes on, but likely not as meant (a warm-up over most of the run)."""


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, and the samples (of all ranks)
    taken so far in this epoch and in all."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    samples: int = 0


@dataclass(frozen=True)
class Shape:
    """How a step is made: processes x micro-batch x accumulation."""

    world: int
    batch_size_train: int
    gradient_accumulation_steps: int

    @property
    def samples_per_step(self) -> int:
        return self.world * self.batch_size_train * self.gradient_accumulation_steps

    def changes(self, other: "Shape") -> str:
        return ", ".join(f"{k} {a} -> {b}" for (k, a), b in zip(asdict(self).items(), asdict(other).values()) if a != b)


@dataclass(frozen=True)
class Stopped:
    """How a signal ended a run: every rank stopped after ``step``; ``checkpoint`` is the last whole
    one, to resume from (None: there is none, no step was done)."""

    signal: int
    status: int  # the exit status: 128 + the signal's number
    ranks: int  # the ranks that had got it when they agreed to stop
    world: int
    step: int
    epoch: int
    checkpoint: Path | None

    def message(self, resume: str | None) -> str:
        """What the run's end says: with ``resume`` (rank 0) the command to resume, else a line."""
        name = signal.Signals(self.signal).name
        if resume is None:
            return f"stopped by {name} after step {self.step}"
        told = f" (sent to {self.ranks} of {self.world} ranks)" if self.world > 1 else ""
        if self.checkpoint is None:
            return f"stopped by {name}{told} before its first step: no checkpoint to resume from; start it again"
        return (f"stopped by {name}{told} after step {self.step} (epoch {self.epoch}); the checkpoint "
                f"{self.checkpoint} is whole. To resume from it: {resume}")


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is taken over: labels are shifted one left, so the first never counts."""
    return int((labels[:, 1:] != IGNORE).sum())


class Trainer:
    def __init__(self, cfg, stores: list[str | Path], val_store: str | Path | None, output_dir: Path,
                 engine: str = "torch", resume: bool = False, rebatch: bool = False, progress=None,
                 strict: bool = False):
        """Check the inputs; nothing heavy happens before :meth:`setup`. Every store it will read is
        checked here, before a model is built (:meth:`_check_stores`)."""
        if engine not in ("torch", "deepspeed"):
            raise TrainError(f"--engine must be 'torch' or 'deepspeed', got {engine!r}")
        self.cfg, self.stores, self.val_store = cfg, [str(p) for p in stores], val_store  # folders or URLs
        self.checked_stores = self._check_stores()
        self.output_dir, self.engine_name, self.resume, self.rebatch = Path(output_dir), engine, resume, rebatch
        self.progress = progress  # callable(step, total, record) or None
        self.strict = strict  # a sample that cannot be made is an error, not skipped
        self.stopped: Stopped | None = None  # set when a signal stopped train()
        done = checkpoints(self.output_dir)
        if done and not resume:
            raise TrainError(f"{self.output_dir} holds checkpoints already: pass --resume to continue, "
                             "or choose another --output-dir")
        if resume and not done:
            raise TrainError(f"--resume: {self.output_dir} holds no checkpoint to resume from")
        if resume:
            self._check_resumed_features(done[-1])
        if cfg.run.use_wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise TrainError("run.use_wandb is true but wandb is not installed: "
                                 "pip install wandb, or set --set run.use_wandb=false") from None

    def _check_stores(self) -> dict[str, list[FeatureStore]]:
        """The training and validation stores, opened and checked ("train", "val": [] without one):
        the features model.modalities needs, their shard files, the same encoders in every one, and
        the config's label sets (a model learns and is scored in them). A StoreError naming the store."""
        cfg, val = self.cfg, [self.val_store] if self.val_store else []
        stores = open_stores([*self.stores, *val], cfg.model.modalities)
        for store in stores:
            check_store_labels(store, cfg.emotions, cfg.intents, "the run's config")
        return {"train": stores[:len(self.stores)], "val": stores[len(self.stores):]}

    def _check_resumed_features(self, folder: Path) -> None:
        """The stores hold the features the checkpoint to resume from was trained on (a
        FeatureMismatch naming the difference, before a model is built). A checkpoint whose
        settings do not read is left to :meth:`_load_state`, which names the earlier one to resume from."""
        try:
            settings = verify_checkpoint(folder)
        except CheckpointError:
            return
        for store in self.checked_stores["train"] + self.checked_stores["val"]:
            check_fit(feature_facts(store), settings, folder, str(store.path),
                      "resume on stores of the features it was trained on, or train anew into another --output-dir")

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build, in dependency order: distributed state, data, model, optimizer, engine, logs. The
        data, and every check of it, come before the model (a minute's load at 7B)."""
        cfg, run = self.cfg, self.cfg.run
        if self.engine_name == "deepspeed":
            single_process_env()  # no launcher: rank 0 of 1 (DeepSpeed would look for MPI)
        self.dist = Distributed.start(run.device)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        self.dtype = resolve_precision(run, self.device)
        self._check_shared_output()
        torch.manual_seed(run.seed)  # the same initial weights on every rank

        facts = feature_facts(self.checked_stores["train"][0])
        if self.rank == 0 and (mixed := dtype_warning([*self.stores, *filter(None, [self.val_store])])):
            warnings.warn(mixed, TrainWarning, stacklevel=2)
        from transformers import AutoTokenizer

        caption_vocab = len(AutoTokenizer.from_pretrained(str(cfg.model.caption_tokenizer_path)))
        settings = XMEISettings.from_config(cfg, caption_vocab_size=caption_vocab, **facts)
        builder = settings.prompt_builder(llm_tokenizer(cfg.model.llama_model_path))
        self._setup_data(settings, builder)
        self.model = XMEIQwen(settings, tokenizer=builder.tokenizer, device=self.device, dtype=self.dtype)
        self._check_same_frozen_weights()
        if self.rank:  # each rank its own dropout
            torch.manual_seed(run.seed + self.rank)
        if not self.resume:  # a resumed run restores them with the weights
            self._set_feature_statistics()

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.dim() >= 2]  # no weight decay on biases and norms
        rest = [p for p in trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=run.init_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine = self.ddp = None
        if self.engine_name == "deepspeed":
            self._setup_deepspeed()
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # the frozen weights are equal on every rank (checked above): not broadcast at start
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, frozen_names(self.model))
            # every trainable parameter gets a gradient each step; the feature statistics are equal everywhere
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                               broadcast_buffers=False)
        self._check_master_weights()

        self.position = Position()
        self.saved_at: Position | None = None  # the position of the last checkpoint written or resumed from
        prefix = f"rank {self.rank}: " if self.world > 1 else ""
        self.signals = StopSignals(run.preempt_grace_s, self._last_whole, prefix)  # entered while train() runs
        if self.resume:
            self._load_state(checkpoints(self.output_dir)[-1])
        self.logs, self.tensorboard, self.wandb = self.output_dir / "logs", None, None
        if self.rank == 0:
            self.logs.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.logs / "tensorboard"))
            if run.use_wandb:
                import wandb

                self.wandb = wandb.init(project="xmei", config=cfg.to_dict(), dir=str(self.logs))
        self._check_checkpoint_space(start=True)

    def _setup_data(self, settings: XMEISettings, builder) -> None:
        """The training and validation samples (of the stores checked in ``__init__``), the epoch's
        length and sampler; a max_length too short for some pair of labels, no ok clip or too few
        clips for one step are errors."""
        run = self.cfg.run
        self.train_data = StoreSamples(self.stores, builder, settings.modalities, self.checked_stores["train"])
        labels = self.train_data.labels
        need, emotion, intent = max((builder.required_length(e, i), e, i)
                                    for e in labels["emotions"] for i in labels["intents"])
        if need > builder.max_length:
            raise TrainError(f"model.max_length {builder.max_length} cannot hold a training sample with the labels "
                             f"{emotion!r} / {intent!r}: the prompt without its subtitle, the answer up to its "
                             f"explanation and the end token take {need} tokens; set model.max_length to at least {need}")
        # samples cut to max_length and samples that could not be made, over all ranks, in this process's run
        self.faults = {"truncated": 0, "skipped": 0, "val_truncated": 0, "val_skipped": 0}
        self.skipped_clips: list[dict] = []  # rank 0: {"clip", "reason", "where"} of each skipped sample
        self.train_data.hide_captions(settings.model.caption_dropout, run.seed)
        if len(self.train_data) == 0:
            raise TrainError(f"no ok clip in {[str(p) for p in self.stores]}")
        self.shape = Shape(self.world, run.batch_size_train, run.gradient_accumulation_steps)
        per_step = self.shape.samples_per_step
        self.steps_per_epoch = run.iters_per_epoch or len(self.train_data) // per_step
        if self.steps_per_epoch < 1:
            raise TrainError(f"{len(self.train_data)} clips cannot fill one step of {per_step} samples "
                             f"({self.world} process(es) x batch {run.batch_size_train} x accumulation "
                             f"{run.gradient_accumulation_steps})")
        self.epoch_samples = self.steps_per_epoch * per_step
        self.total_steps = run.max_epoch * self.steps_per_epoch
        self.warmup_steps, warning = resolve_warmup(run.warmup_steps, self.total_steps)
        if warning and self.rank == 0:
            warnings.warn(warning, TrainWarning, stacklevel=3)
        self.sampler = EpochSampler(self.train_data, run.seed, run.shuffle_shards, self.epoch_samples,
                                    rank=self.rank, world=self.world)
        self.val_data = StoreSamples([self.val_store], builder, settings.modalities, self.checked_stores["val"]) \
            if self.val_store else None

    def _check_shared_output(self) -> None:
        """Several nodes write one checkpoint folder (each rank its ZeRO share, rank 0 the rest, then
        renames it), so every rank must see the same --output-dir: rank 0 writes a token there and
        each rank looks for it. A rank that cannot see it stops every rank, naming the folder."""
        if self.world == 1:
            return
        token = self.output_dir / f".xmei-shared-{self.dist.broadcast(os.urandom(8).hex())}"
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            token.touch()
        self.dist.barrier()
        blind = [rank for rank, seen in enumerate(self.dist.all_gather(token.exists())) if not seen]
        self.dist.barrier()
        if self.rank == 0:
            token.unlink()
        if blind:
            raise TrainError(f"--output-dir {self.output_dir} is not shared by every rank: rank(s) "
                             f"{', '.join(map(str, blind))} cannot see the file rank 0 wrote there. A run of "
                             "several nodes writes its checkpoints into one folder on a filesystem all nodes "
                             "mount (NFS, Lustre, ...): give every node the same shared --output-dir")

    def _check_same_frozen_weights(self) -> None:
        """The frozen weights are not broadcast at start (15 GB for a 7B LLM): every rank read them
        from disk, and a checksum of their bits, compared here, shows they read the same."""
        if self.world == 1:
            return
        sums = self.dist.all_gather(weights_checksum(self.model))
        if len(set(sums)) > 1:
            differ = [rank for rank, value in enumerate(sums) if value != sums[0]]
            raise TrainError(f"the frozen weights differ between ranks: rank(s) {', '.join(map(str, differ))} "
                             f"read other weights than rank 0 from {self.cfg.model.llama_model_path} (another "
                             "copy on another node?): every rank must load the same LLM")

    def _check_master_weights(self) -> None:
        """Every trainable weight is fp32 whatever the precision (bf16 trainable weights would lose
        small updates); an engine that cast them would break the precision recipe: a bug."""
        module = self.engine.module if self.engine else self.model
        wrong = sorted({str(p.dtype) for p in module.parameters() if p.requires_grad and p.dtype != torch.float32})
        if wrong:
            raise RuntimeError(f"trainable weights in {', '.join(wrong)} after {self.engine_name} set up: "
                               "the precision recipe keeps them fp32")

    def _set_feature_statistics(self, clips: int = 512, chunk: int = 32) -> None:
        """Feature statistics of the LQ-Formers from up to ``clips`` training clips, evenly spread,
        summed ``chunk`` clips at a time (full-size patch features are ~4 MB a clip)."""
        data = self.train_data
        positions = np.linspace(0, len(data) - 1, min(clips, len(data))).round().astype(int).tolist()
        sums = {m: [0, 0.0, 0.0] for m in data.modalities}  # count, sum, sum of squares per dimension
        for start in range(0, len(positions), chunk):
            for sample in data.__getitems__(positions[start:start + chunk]):
                for m in sums:
                    if m == "audio" and not sample["has_audio"]:  # zeros, not features
                        continue
                    flat = np.asarray(sample[m], np.float64).reshape(-1, np.shape(sample[m])[-1])
                    sums[m][0] += len(flat)
                    sums[m][1] += flat.sum(0)
                    sums[m][2] += (flat ** 2).sum(0)
        for m, (count, total, squares) in sums.items():
            if count > 1:
                mean = total / count
                std = np.sqrt(np.maximum(squares - count * mean**2, 0.0) / (count - 1))
                self.model.lqformers[m].set_feature_statistics(torch.as_tensor(mean), torch.as_tensor(std))

    def _lr_factor(self, step: int) -> float:
        r = self.cfg.run
        return linear_warmup_cosine_lr(step, self.total_steps, r.init_lr, r.min_lr, r.warmup_lr, self.warmup_steps) / r.init_lr

    def _setup_deepspeed(self) -> None:
        import deepspeed

        run = self.cfg.run
        # No "bf16" / "fp16" / "torch_autocast" section: DeepSpeed's own mixed precision would cast every
        # parameter (the LQ-Formers too) to bf16. The model autocasts its forward itself (XMEIQwen.autocast)
        # and its trainable weights are fp32, so ZeRO-2 keeps fp32 master weights, fp32 optimizer state and
        # accumulates and reduce-scatters fp32 gradients, as the torch engine does.
        config = {
            "train_micro_batch_size_per_gpu": run.batch_size_train,
            "gradient_accumulation_steps": run.gradient_accumulation_steps,
            "gradient_clipping": run.max_grad_norm,
            "zero_optimization": {"stage": 2},
            "communication_data_type": "fp32",
            "zero_allow_untested_optimizer": True,  # our AdamW with its two parameter groups
            "steps_per_print": 10**9,
        }
        with unbroadcast_frozen(self.model):  # equal on every rank (checked in setup)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=config,
                dist_init_required=True)

    def loader(self, data: StoreSamples, sampler, batch_size: int) -> DataLoader:
        return loader(data, BatchSampler(sampler, batch_size, drop_last=False),
                      partial(collate, pad_id=self.model.tokenizer.pad_token_id), self.cfg.run.num_workers,
                      pin_memory=self.device.type == "cuda", seed=self.cfg.run.seed)

    # ------------------------------------------------------------------ training

    def train(self) -> dict:
        """Run to max_epoch, or until a SIGTERM or SIGINT stops every rank with a checkpoint
        (:attr:`stopped` then says where); returns the last step's record."""
        run, per_step = self.cfg.run, self.shape.samples_per_step
        model = self.engine or self.ddp or self.model
        record: dict = {}
        with self.signals:
            while self.position.epoch < run.max_epoch:
                self.sampler.set_epoch(self.position.epoch, self.position.samples_in_epoch)
                self.train_data.epoch = self.position.epoch  # which captions are hidden (caption dropout)
                batches = iter(self.loader(self.train_data, self.sampler, run.batch_size_train))
                model.train()
                while self.position.samples_in_epoch + per_step <= self.epoch_samples:
                    step = self._step(model, batches)
                    if step is None:  # a signal: every rank stops before this step
                        return self._stop(record)
                    record = step
                    self.signals.after_step(self.position.step, self.rank)  # the test hook; nothing without it
                    more_in_epoch = self.position.samples_in_epoch + per_step <= self.epoch_samples
                    if self.position.step % run.save_every_steps == 0 and more_in_epoch:
                        self.save_checkpoint()
                if self.signals.agreed(self.dist.all_sum(torch.tensor(self.signals.flags()))):  # before validating
                    return self._stop(record)
                val = self.validate() if self.val_data else {"val_loss": None}
                record["val_loss"] = val["val_loss"]
                self._log({"epoch": self.position.epoch, "step": self.position.step, **val})
                self.position.epoch, self.position.samples_in_epoch = self.position.epoch + 1, 0
                self.save_checkpoint()
        return record

    def _stop(self, record: dict) -> dict:
        """Every rank, once they agreed on a signal: a checkpoint of the steps done since the last
        one (none when there are none), then :attr:`stopped`."""
        if self.position != (self.saved_at or Position()):
            self.save_checkpoint()
        done = checkpoints(self.output_dir)
        s = self.signals
        self.stopped = Stopped(s.stop_signal, s.status, s.ranks_signalled, self.world, self.position.step,
                               self.position.epoch, done[-1] if done else None)
        return record

    def _last_whole(self) -> str:
        """What a hard exit (xmei.preempt) says of the checkpoints it leaves."""
        done = checkpoints(self.output_dir)
        return (f"the last whole checkpoint is {done[-1]} (resume from it with --resume)" if done else
                f"no whole checkpoint in {self.output_dir}: start the run again")

    def _step(self, model, batches) -> dict | None:
        """One optimizer step and its record; None, on every rank, when a rank got a stop signal
        (the step is then not begun)."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step
        micro = [next(batches) for _ in range(self.shape.gradient_accumulation_steps)]
        waited = time.perf_counter() - start
        flags = [{k: b.pop(k) for k in FLAGS} for b in micro]  # (B,) each; not model inputs
        truncated = sum(int(f["truncated"].sum()) for f in flags)
        skipped = [p for f in flags for p in f["position"][f["skipped"]].tolist()]
        clips, tokens = sum(len(b["input_ids"]) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro)
        counts = self.dist.all_sum(torch.tensor([sum(target_tokens(b["labels"]) for b in micro), clips, tokens, waited,
                                                 truncated, len(skipped), *self.signals.flags()]))
        if self.signals.agreed(counts[6:]):
            return None
        where = f"step {self.position.step + 1} (epoch {self.position.epoch})"
        skipped_clips = self._skipped(self.train_data, skipped, where) if counts[5] else []
        self.faults["truncated"] += int(counts[4])
        self.faults["skipped"] += int(counts[5])
        targets = torch.tensor(max(counts[0].item(), 1.0), device=self.device)  # of the whole step, all ranks
        # DDP and DeepSpeed average gradients over ranks (and DeepSpeed over micro-batches): undo it,
        # so the gradient is that of the sum over the step's tokens divided by their number
        scale = self.world * (self.shape.gradient_accumulation_steps if self.engine else 1)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last = i == len(micro) - 1
            with self.ddp.no_sync() if self.ddp and not last else nullcontext():
                loss = model(batch, num_items_in_batch=targets).loss  # this micro-batch's share of the step's mean
                if self.engine:
                    self.engine.backward(loss * scale)
                else:
                    (loss * scale).backward()
            loss_sum += loss.detach().float()
            if self.engine and not last:
                self.engine.step()  # counts the micro-step; the optimizer steps at the boundary below
        step_loss = self.dist.all_sum(loss_sum.reshape(1)).item()  # every rank sees every rank's loss
        if not np.isfinite(step_loss):
            raise TrainError(f"loss is {step_loss} at step {self.position.step + 1} (epoch {self.position.epoch}); "
                             f"the last good checkpoint is kept in {self.output_dir}")
        if self.engine:
            self.engine.step()  # clips, steps the optimizer and the scheduler at the accumulation boundary
            grad_norm = float(self.engine.get_global_grad_norm())
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.run.max_grad_norm or float("inf")).item()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position.step += 1
        self.position.samples_in_epoch += self.shape.samples_per_step
        self.position.samples += self.shape.samples_per_step
        seconds = time.perf_counter() - start
        record = {"step": self.position.step, "epoch": self.position.epoch, "loss": step_loss, "lr": lr,
                  "grad_norm": grad_norm,  # before clipping
                  "samples": self.position.samples, "clips_per_s": counts[1].item() / seconds,
                  "tokens": int(counts[2].item()), "target_tokens": int(counts[0].item()),
                  "data_wait": counts[3].item() / self.world / seconds, "seconds": seconds,
                  "truncated": int(counts[4]), "skipped": int(counts[5])}
        if self.device.type == "cuda":  # this process's peak so far: weights, optimizer state, activations
            record["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if skipped_clips:
            record["skipped_clips"] = skipped_clips
        self._log(record)
        return record

    def _skipped(self, data: StoreSamples, positions: list[int], where: str) -> list[dict]:
        """Called by every rank when any rank skipped samples (``positions``: this rank's): rank 0
        returns and keeps every rank's {clip, reason}, the others get []. Under ``strict`` every
        rank stops instead, rank 0 naming the clips."""
        mine = [{"clip": data.strings["video_id"][p], "reason": data.failure(p)} for p in positions]
        gathered = self.dist.gather(mine)
        clips = [c for part in gathered for c in part] if gathered is not None else []
        if self.strict:
            named = "; ".join(f"clip {c['clip']}: {c['reason']}" for c in clips) or "a clip of another rank"
            raise TrainError(f"--strict: {where}: a sample cannot be made ({named}); the checkpoints written so far "
                             f"are kept in {self.output_dir}. Without --strict such a sample is skipped and counted")
        self.skipped_clips += [{**c, "where": where} for c in clips]
        return clips

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss per target token over the val store (``val_loss``): every ok clip once, split
        over the ranks, the sums gathered from all of them; and the samples cut (``val_truncated``)
        or skipped (``val_skipped``, with ``val_skipped_clips`` when any)."""
        self.model.eval()  # the bare model: no collective inside its forward, so ranks may differ in batches
        sampler = EpochSampler(self.val_data, 0, shuffle=False, rank=self.rank, world=self.world)
        total = torch.zeros(4)  # loss summed over target tokens, target tokens, samples truncated, skipped
        skipped = []  # this rank's positions
        for batch in self.loader(self.val_data, sampler, self.cfg.run.batch_size_eval):
            flags = {k: batch.pop(k) for k in FLAGS}
            skipped += flags["position"][flags["skipped"]].tolist()
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss_sum = self.model(batch, num_items_in_batch=1).loss  # divided by 1: the sum
            total += torch.tensor([loss_sum.item(), target_tokens(batch["labels"]), int(flags["truncated"].sum()),
                                   int(flags["skipped"].sum())])
        self.model.train()
        loss, count, truncated, lost = self.dist.all_sum(total).tolist()
        where = f"validation after epoch {self.position.epoch}"
        clips = self._skipped(self.val_data, skipped, where) if lost else []
        self.faults["val_truncated"] += int(truncated)
        self.faults["val_skipped"] += int(lost)
        record = {"val_loss": loss / max(count, 1), "val_truncated": int(truncated), "val_skipped": int(lost)}
        return {**record, "val_skipped_clips": clips} if clips else record

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with writing(self.logs, "the training log: train.jsonl and the TensorBoard events", self._resume_hint()):
            _append_line(self.logs / "train.jsonl", json.dumps(record) + "\n")
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    tag = f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
                    self.tensorboard.add_scalar(tag, value, record["step"])
        if self.wandb is not None:  # numbers only: the skipped clips are in train.jsonl
            self.wandb.log({k: v for k, v in record.items() if not isinstance(v, list)}, step=record["step"])
        if self.progress:
            self.progress(record["step"], self.total_steps, record)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNNN (:meth:`_write_checkpoint`), once the disk is seen to hold it.
        Too little free space ends the run before anything is written; a disk that fills while it is
        written ends it with the step_N.partial folder removed. Either way a DiskFullError names the
        filesystem, and the earlier checkpoints are kept as they were."""
        self._check_checkpoint_space()
        folder = self._checkpoint_path()
        partial_folder = folder.with_name(folder.name + ".partial")
        try:
            with writing(partial_folder, f"checkpoint {folder.name}", self._resume_hint()):
                return self._write_checkpoint(folder, partial_folder)
        except DiskFullError:
            if self.rank == 0:  # nothing of it may stay to be taken for whole, nor hold the space
                shutil.rmtree(partial_folder, ignore_errors=True)
            raise

    def _checkpoint_path(self) -> Path:
        """The folder of the checkpoint of the current step."""
        return self.output_dir / "checkpoints" / f"step_{self.position.step:07d}"

    def _checkpoint_size(self) -> tuple[int, str]:
        """(bytes, what they are) of a checkpoint: the last one's size, else at least the trainable
        weights and their optimizer state (CHECKPOINT_BYTES)."""
        done = checkpoints(self.output_dir)
        if done:
            return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()), f"the size of {done[-1].name}"
        count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        per = CHECKPOINT_BYTES[self.engine_name]
        return count * per, f"at least {count:,} trainable parameters x {per} bytes: weights and optimizer state"

    def _check_checkpoint_space(self, start: bool = False) -> None:
        """Rank 0 compares the free space of --output-dir with a checkpoint's size, and every rank
        ends alike: a DiskFullError when one does not fit. At the ``start`` it warns (TrainWarning)
        when the checkpoints the run holds at once (run.keep_checkpoints, and the next written
        before the oldest is removed) may not fit."""
        refusal = warning = None
        if self.rank == 0:
            run, kept = self.cfg.run, len(checkpoints(self.output_dir))
            size, basis = self._checkpoint_size()
            left = self.total_steps - self.position.step
            saves = left // run.save_every_steps + run.max_epoch - self.position.epoch  # at most, this run
            more = max(1, min(run.keep_checkpoints + 1, kept + saves) - kept)  # at once, before one is removed
            hint = self._resume_hint() if not start else (
                "free space (or choose another --output-dir), then run again" + (" with --resume" if kept else ""))
            what = f"a checkpoint of about {byte_size(size)}: {basis}"
            try:
                warning = check_space(self.output_dir / "checkpoints", size, what, hint,
                                      close=more * size if start else size)
            except DiskFullError as err:
                refusal = str(err)
            if warning:
                warning += (f" (up to {more} checkpoints at once: run.keep_checkpoints={run.keep_checkpoints} kept, "
                            "and the next one written before the oldest is removed)")
        refusal = self.dist.broadcast(refusal)
        if refusal:
            raise DiskFullError(refusal)
        if warning:
            warnings.warn(warning, TrainWarning, stacklevel=3)

    def _resume_hint(self) -> str:
        """What a run that stops on a full disk keeps, and how to go on."""
        done = checkpoints(self.output_dir)
        if not done:
            return "no checkpoint was written before: free space (or choose another --output-dir), then start again"
        return (f"the earlier checkpoints are kept as they were (the newest: {done[-1]}); free space (or move "
                f"{self.output_dir} to a larger disk), then continue with --resume")

    def _write_checkpoint(self, folder: Path, partial_folder: Path) -> Path:
        """``folder`` (checkpoints/step_NNNNNNN), written whole in ``partial_folder`` and renamed:
        the model checkpoint + trainer state; keeps the last K."""
        if self.rank == 0 and partial_folder.exists():  # left by a kill: none of its files may slip in
            shutil.rmtree(partial_folder)
        self.dist.barrier()
        if self.engine:  # every rank writes its part of the ZeRO state
            self.engine.save_checkpoint(str(partial_folder / DEEPSPEED_DIR), tag="state",
                                        exclude_frozen_parameters=True)  # not the 7B frozen weights
        cuda = self.device.type == "cuda"
        rngs = self.dist.gather((torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None))
        if self.rank == 0:
            self.model.save_checkpoint(partial_folder, config=self.cfg.to_dict(absolute=True))
            state = {"position": asdict(self.position), "shape": asdict(self.shape),
                     "rng": [cpu for cpu, _ in rngs], "cuda_rng": [gpu for _, gpu in rngs]}  # one per rank
            if not self.engine:
                state["optimizer"] = self.optimizer.state_dict()
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(state, partial_folder / STATE_FILE)
        self.dist.barrier()
        if self.rank == 0:
            replaced = folder.with_name(folder.name + ".replaced")  # this step's earlier checkpoint, if any
            shutil.rmtree(replaced, ignore_errors=True)  # left by a kill between the two renames
            if folder.exists():  # written again: a run resumed from a stop at an epoch's end
                folder.rename(replaced)
            partial_folder.rename(folder)  # a checkpoint exists whole or not at all
            shutil.rmtree(replaced, ignore_errors=True)
            for old in checkpoints(self.output_dir)[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old)
        self.dist.barrier()
        self.saved_at = replace(self.position)
        return folder

    def _load_state(self, folder: Path) -> None:
        """Resume from ``folder``. A damaged file is an error naming it and the earlier checkpoint a
        resume could start from instead: never a silent fall-back to it, the user decides."""
        try:
            self._restore(folder)
        except CheckpointError as e:
            earlier = [p for p in checkpoints(self.output_dir) if p.name < folder.name]
            hint = (f"to resume from {earlier[-1].name} instead, move {folder} out of {folder.parent} (or rename it, "
                    f"e.g. to {folder.name}.damaged)" if earlier else
                    "no earlier checkpoint is kept: restore the file, or start a new --output-dir")
            raise TrainError(f"{e}. {folder.name} cannot be resumed from; {hint}") from e
        self.saved_at = replace(self.position)

    def _restore(self, folder: Path) -> None:
        """Every file checked first (present, whole), then the weights, optimizer, schedule, position, RNG."""
        state_file, deepspeed_dir = folder / STATE_FILE, folder / DEEPSPEED_DIR
        verify_checkpoint(folder)  # settings, config, trainable weights, adapter or whole LLM
        check_torch_file(state_file)
        if self.engine:
            check_deepspeed(deepspeed_dir / "state", self.rank)
        with loading(state_file):
            # tensors and plain values only, onto the CPU first: never onto the GPU they were saved from
            state = torch.load(state_file, weights_only=True, map_location="cpu")
        if isinstance(state, dict) and "position" in state and "shape" not in state:
            raise TrainError(f"{folder} was written by an earlier xmei whose trainer state lacks the run's shape and "
                             "the samples seen: it cannot be resumed; start a new --output-dir (its weights load "
                             "with `xmei eval --checkpoint`)")
        needed = {"position", "shape", "rng", "cuda_rng", *(() if self.engine else ("optimizer", "scheduler"))}
        if not isinstance(state, dict) or needed - state.keys():
            raise CheckpointError(f"{state_file} is not a trainer state of this xmei ({DAMAGED})")
        with loading(state_file):
            saved, position = Shape(**state["shape"]), Position(**state["position"])
        if saved != self.shape:
            self._check_rebatch(folder, saved)
        self.model.load_trainable(folder)
        if self.engine:  # its states hold every trainable weight: the adapter's, or the whole LLM's
            with loading(deepspeed_dir):
                loaded, _ = self.engine.load_checkpoint(str(deepspeed_dir), tag="state", load_module_strict=False)
            if loaded is None:  # DeepSpeed only warns
                raise CheckpointError(f"{deepspeed_dir}: DeepSpeed found no states to load")
        else:
            if self.model.settings.llm_part == "adapter":
                self.model.load_adapter(folder)
            elif self.model.settings.llm_part == "llm":
                self.model.load_llm(folder)
            with loading(state_file):
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
        self.position = position
        if saved != self.shape:  # the same sample, the schedule at the step these samples make now
            self.position.step = self.position.samples // self.shape.samples_per_step
            self.scheduler.last_epoch = self.position.step
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * self._lr_factor(self.position.step)
        if self.rank < len(state["rng"]):
            torch.set_rng_state(state["rng"][self.rank])
            if self.device.type == "cuda" and state["cuda_rng"][self.rank] is not None:
                torch.cuda.set_rng_state(state["cuda_rng"][self.rank], self.device)
        else:  # a rank the checkpoint did not have
            torch.manual_seed(self.cfg.run.seed + self.rank + self.position.step)

    def _check_rebatch(self, folder: Path, saved: Shape) -> None:
        """Refuse a resume with another shape, unless --rebatch (and ZeRO can take it)."""
        def told(shape: Shape) -> str:
            return (f"{shape.world} process(es) x batch {shape.batch_size_train} x accumulation "
                    f"{shape.gradient_accumulation_steps} = {shape.samples_per_step} samples a step")

        change = f"{folder} was trained with {told(saved)}; this run has {told(self.shape)} ({saved.changes(self.shape)})"
        if not self.rebatch:
            raise TrainError(f"{change}. Resume it as it was launched, or pass --rebatch to go on from the same "
                             "sample with the schedule recomputed from the samples seen")
        if self.engine and saved.world != self.world:
            raise TrainError(f"{change}. ZeRO-2 keeps each process's share of the optimizer state, so a DeepSpeed "
                             f"run resumes on {saved.world} process(es); --rebatch may change the batch size and "
                             "the accumulation")

    def cleanup(self) -> None:
        """Close the logs and leave the process group (also after a failed step). After a stop, every
        rank waits here for the others first: a launcher ends the other ranks once one exits, and
        rank 0 has said where to resume before it comes here."""
        if getattr(self, "stopped", None) is not None:
            self.dist.barrier()
        if getattr(self, "tensorboard", None) is not None:
            with writing(self.logs, "the TensorBoard events", self._resume_hint()):  # they are written on closing
                self.tensorboard.close()
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
        if getattr(self, "dist", None) is not None:
            self.dist.close()


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` whole or not at all: a write that fails (a full disk) is undone."""
    with open(path, "ab", buffering=0) as f:
        start = os.fstat(f.fileno()).st_size
        data = memoryview(line.encode())
        try:
            while data:
                data = data[f.write(data):]  # a full disk writes short, then fails
        except OSError:
            f.truncate(start)
            raise
