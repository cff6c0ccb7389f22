"""Stage 2: train the LQ-Formers and the LoRA Qwen on cached features.

    trainer = Trainer(cfg, stores, val_store, output_dir, engine="torch", resume=False)
    trainer.setup(); trainer.train(); trainer.cleanup()

One loop, two engines, each in one process or many (``torchrun`` / ``deepspeed`` launchers, any
number of GPUs and nodes; gloo between CPU processes): ``torch`` (DistributedDataParallel when
there are several processes) and ``deepspeed`` (ZeRO-2; without a launcher it runs as rank 0 of 1).

A step: fetch the step's micro-batches -> count their target tokens over all ranks -> forward and
backward each, its loss the sum over its target tokens divided by that count (so every token of
the step weighs the same, whatever micro-batch or rank it is in) -> agree on the loss (a
non-finite loss on any rank stops every rank) -> clip -> optimizer step -> log -> checkpoint.
N processes with batch b therefore take the same steps as one process with batch N*b.

A checkpoint holds the model checkpoint (safetensors + adapter + config) and the trainer state
(optimizer, scheduler, each rank's RNG, the data position in samples, and the run's shape:
processes x batch x accumulation), so ``resume`` continues exactly: the same per-step losses as an
uninterrupted run. A resume with another shape is refused, naming what changed, unless
``rebatch``: then it goes on from the same sample with the schedule recomputed from the samples seen.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from stores import FeatureStore
from xmei.data import EpochSampler, StoreSamples, feature_facts, loader
from xmei.distributed import Distributed, single_process_env
from xmei.errors import UserError
from xmei.model import CHECKPOINT_FILES, XMEIQwen, XMEISettings
from xmei.prompt import IGNORE, collate
from xmei.schedule import linear_warmup_cosine_lr, resolve_warmup

__all__ = ["TrainError", "TrainWarning", "Trainer", "checkpoints"]

STATE_FILE = "trainer_state.pt"  # torch.save of tensors and plain values; loaded with weights_only=True
DEEPSPEED_DIR = "deepspeed"


def checkpoints(output_dir: Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first (a ``.partial`` one was cut off by a kill)."""
    return sorted(p for p in Path(output_dir).glob("checkpoints/step_*") if not p.name.endswith(".partial"))


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


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is taken over: labels are shifted one left, so the first never counts."""
    return int((labels[:, 1:] != IGNORE).sum())


class Trainer:
    def __init__(self, cfg, stores: list[Path], val_store: Path | None, output_dir: Path, engine: str = "torch",
                 resume: bool = False, rebatch: bool = False, progress=None):
        """Check the inputs; nothing heavy happens before :meth:`setup`."""
        if engine not in ("torch", "deepspeed"):
            raise TrainError(f"--engine must be 'torch' or 'deepspeed', got {engine!r}")
        for path in [*stores, *([val_store] if val_store else [])]:
            FeatureStore(path)  # raises StoreError naming the path
        self.cfg, self.stores, self.val_store = cfg, [Path(p) for p in stores], val_store
        self.output_dir, self.engine_name, self.resume, self.rebatch = Path(output_dir), engine, resume, rebatch
        self.progress = progress  # callable(step, total, record) or None
        done = checkpoints(self.output_dir)
        if done and not resume:
            raise TrainError(f"{self.output_dir} holds checkpoints already: pass --resume to continue, "
                             "or choose another --output-dir")
        if resume and not done:
            raise TrainError(f"--resume: {self.output_dir} holds no checkpoint to resume from")
        if cfg.run.use_wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise TrainError("run.use_wandb is true but wandb is not installed: "
                                 "pip install wandb, or set --set run.use_wandb=false") from None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build, in dependency order: distributed state, data, model, optimizer, engine, logs."""
        cfg, run = self.cfg, self.cfg.run
        if self.engine_name == "deepspeed":
            single_process_env()  # no launcher: rank 0 of 1 (DeepSpeed would look for MPI)
        self.dist = Distributed.start(run.device)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        torch.manual_seed(run.seed)  # the same initial weights on every rank

        facts = feature_facts(FeatureStore(self.stores[0]))
        from transformers import AutoTokenizer

        caption_vocab = len(AutoTokenizer.from_pretrained(str(cfg.model.caption_tokenizer_path)))
        settings = XMEISettings.from_config(cfg, caption_vocab_size=caption_vocab, **facts)
        self.model = XMEIQwen(settings, device=self.device)
        if self.rank:  # each rank its own dropout
            torch.manual_seed(run.seed + self.rank)
        builder = self.model.prompt_builder()
        self.train_data = StoreSamples(self.stores, builder, settings.modalities)
        self.train_data.hide_captions(cfg.model.caption_dropout, run.seed)
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
            warnings.warn(warning, TrainWarning, stacklevel=2)
        self.sampler = EpochSampler(self.train_data, run.seed, run.shuffle_shards, self.epoch_samples,
                                    rank=self.rank, world=self.world)
        self.val_data = StoreSamples([self.val_store], builder, settings.modalities) if self.val_store else None
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

            # every trainable parameter gets a gradient each step; the feature statistics are equal everywhere
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                               broadcast_buffers=False)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp and self.device.type == "cuda")

        self.position = Position()
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
        config = {
            "train_micro_batch_size_per_gpu": run.batch_size_train,
            "gradient_accumulation_steps": run.gradient_accumulation_steps,
            "gradient_clipping": run.max_grad_norm,
            "zero_optimization": {"stage": 2},
            "bf16": {"enabled": run.amp and self.device.type == "cuda"},
            "zero_allow_untested_optimizer": True,  # our AdamW with its two parameter groups
            "steps_per_print": 10**9,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=config,
            dist_init_required=True)

    def loader(self, data: StoreSamples, sampler, batch_size: int) -> DataLoader:
        return loader(data, BatchSampler(sampler, batch_size, drop_last=False),
                      partial(collate, pad_id=self.model.tokenizer.pad_token_id), self.cfg.run.num_workers,
                      pin_memory=self.device.type == "cuda", seed=self.cfg.run.seed)

    # ------------------------------------------------------------------ training

    def train(self) -> dict:
        """Run to max_epoch; returns the last step's record."""
        run, per_step = self.cfg.run, self.shape.samples_per_step
        model = self.engine or self.ddp or self.model
        record: dict = {}
        while self.position.epoch < run.max_epoch:
            self.sampler.set_epoch(self.position.epoch, self.position.samples_in_epoch)
            self.train_data.epoch = self.position.epoch  # which captions are hidden (caption dropout)
            batches = iter(self.loader(self.train_data, self.sampler, run.batch_size_train))
            model.train()
            while self.position.samples_in_epoch + per_step <= self.epoch_samples:
                record = self._step(model, batches)
                more_in_epoch = self.position.samples_in_epoch + per_step <= self.epoch_samples
                if self.position.step % run.save_every_steps == 0 and more_in_epoch:
                    self.save_checkpoint()
            record["val_loss"] = self.validate() if self.val_data else None
            self._log({"epoch": self.position.epoch, "step": self.position.step, "val_loss": record["val_loss"]})
            self.position.epoch, self.position.samples_in_epoch = self.position.epoch + 1, 0
            self.save_checkpoint()
        return record

    def _step(self, model, batches) -> dict:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step
        micro = [next(batches) for _ in range(self.shape.gradient_accumulation_steps)]
        waited = time.perf_counter() - start
        clips, tokens = sum(len(b["input_ids"]) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro)
        counts = self.dist.all_sum(torch.tensor([sum(target_tokens(b["labels"]) for b in micro), clips, tokens, waited]))
        targets = torch.tensor(max(counts[0].item(), 1.0), device=self.device)  # of the whole step, all ranks
        # DDP and DeepSpeed average gradients over ranks (and DeepSpeed over micro-batches): undo it,
        # so the gradient is that of the sum over the step's tokens divided by their number
        scale = self.world * (self.shape.gradient_accumulation_steps if self.engine else 1)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last = i == len(micro) - 1
            with self.ddp.no_sync() if self.ddp and not last else nullcontext(), self.autocast:
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
                  "data_wait": counts[3].item() / self.world / seconds, "seconds": seconds}
        self._log(record)
        return record

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss per target token over the val store: every ok clip once, split over the ranks,
        the sums gathered from all of them."""
        self.model.eval()  # the bare model: no collective inside its forward, so ranks may differ in batches
        sampler = EpochSampler(self.val_data, 0, shuffle=False, rank=self.rank, world=self.world)
        total = torch.zeros(2)  # loss summed over target tokens, target tokens
        for batch in self.loader(self.val_data, sampler, self.cfg.run.batch_size_eval):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast:
                loss_sum = self.model(batch, num_items_in_batch=1).loss  # divided by 1: the sum
            total += torch.tensor([loss_sum.item(), target_tokens(batch["labels"])])
        self.model.train()
        loss, count = self.dist.all_sum(total).tolist()
        return loss / max(count, 1)

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.logs / "train.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.progress:
            self.progress(record["step"], self.total_steps, record)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNNN: the model checkpoint + trainer state; keeps the last K."""
        folder = self.output_dir / "checkpoints" / f"step_{self.position.step:07d}"
        partial_folder = folder.with_name(folder.name + ".partial")
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
            if folder.exists():
                shutil.rmtree(folder)
            partial_folder.rename(folder)  # a checkpoint exists whole or not at all
            for old in checkpoints(self.output_dir)[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old)
        self.dist.barrier()
        return folder

    def _load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = torch.load(folder / STATE_FILE, weights_only=True)  # tensors and plain values only
        if "shape" not in state:
            raise TrainError(f"{folder} was written by an earlier xmei whose trainer state lacks the run's shape and "
                             "the samples seen: it cannot be resumed; start a new --output-dir (its weights load "
                             "with `xmei eval --checkpoint`)")
        saved = Shape(**state["shape"])
        if saved != self.shape:
            self._check_rebatch(folder, saved)
        self.model.load_trainable(folder)
        if self.engine:
            self.engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", load_module_strict=False)
        else:
            from peft import set_peft_model_state_dict

            adapter = folder / CHECKPOINT_FILES["adapter"] / "adapter_model.safetensors"
            if adapter.exists():
                set_peft_model_state_dict(self.model.llm, load_file(adapter))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.position = Position(**state["position"])
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
        """Close the logs and leave the process group (also after a failed step)."""
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
        if getattr(self, "dist", None) is not None:
            self.dist.close()
