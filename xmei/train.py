"""Stage 2: train the LQ-Formers and the LoRA Qwen on cached features.

    trainer = Trainer(cfg, stores, val_store, output_dir, engine="torch", resume=False)
    trainer.setup(); trainer.train(); trainer.cleanup()

One loop, two engines: ``torch`` (one process, CPU or one GPU) and ``deepspeed`` (ZeRO-2, under
the ``deepspeed`` or ``torchrun`` launcher, any number of GPUs and nodes; CPU with
``DS_ACCELERATOR=cpu``). A step: set the rate -> micro-batches (forward, backward) -> clip ->
optimizer step -> log -> checkpoint. A checkpoint holds the model checkpoint (safetensors +
adapter + config) and the trainer state (optimizer, scheduler, RNG, data position), so
``resume`` continues exactly: the same per-step losses as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from stores import FeatureStore
from xmei.data import EpochSampler, StoreSamples, feature_facts, loader
from xmei.model import CHECKPOINT_FILES, XMEIQwen, XMEISettings
from xmei.prompt import PromptBuilder, collate
from xmei.schedule import linear_warmup_cosine_lr

__all__ = ["TrainError", "Trainer", "checkpoints"]

STATE_FILE = "trainer_state.pt"  # torch.save of tensors and plain values; loaded with weights_only=True
DEEPSPEED_DIR = "deepspeed"


def checkpoints(output_dir: Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first (a ``.partial`` one was cut off by a kill)."""
    return sorted(p for p in Path(output_dir).glob("checkpoints/step_*") if not p.name.endswith(".partial"))


class TrainError(RuntimeError):
    """A run that cannot start or cannot go on (bad inputs, NaN loss)."""


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the epoch they are in."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


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
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(run.seed)

        facts = feature_facts(FeatureStore(self.stores[0]))
        from transformers import AutoTokenizer

        caption_vocab = len(AutoTokenizer.from_pretrained(str(cfg.model.caption_tokenizer_path)))
        settings = XMEISettings.from_config(cfg, caption_vocab_size=caption_vocab, **facts)
        self.model = XMEIQwen(settings).to(self.device)
        builder = PromptBuilder(self.model.tokenizer, settings.num_video_query_token, settings.num_audio_query_token,
                                settings.prompt_format, settings.max_length)
        self.train_data = StoreSamples(self.stores, builder)
        if len(self.train_data) == 0:
            raise TrainError(f"no ok clip in {[str(p) for p in self.stores]}")
        per_step = run.batch_size_train * run.gradient_accumulation_steps * self.world  # samples per optimizer step
        self.steps_per_epoch = run.iters_per_epoch or len(self.train_data) // per_step
        if self.steps_per_epoch < 1:
            raise TrainError(f"{len(self.train_data)} clips cannot fill one step of {per_step} samples")
        self.total_steps = run.max_epoch * self.steps_per_epoch
        self.sampler = EpochSampler(self.train_data, run.seed, run.shuffle_shards, self.steps_per_epoch * per_step,
                                    rank=self.rank, world=self.world)
        self.val_data = StoreSamples([self.val_store], builder) if self.val_store else None
        if not self.resume:  # a resumed run restores them with the weights
            self._set_feature_statistics()

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.dim() >= 2]  # no weight decay on biases and norms
        rest = [p for p in trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=run.init_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.engine = None
        if self.engine_name == "deepspeed":
            self._setup_deepspeed()
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp and self.device.type == "cuda")

        self.position = Position()
        if self.resume:
            self._load_state(checkpoints(self.output_dir)[-1])
        self.logs = self.output_dir / "logs"
        if self.rank == 0:
            self.logs.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.logs / "tensorboard"))
            self.wandb = None
            if run.use_wandb:
                import wandb

                self.wandb = wandb.init(project="xmei", config=cfg.to_dict(), dir=str(self.logs))

    def _set_feature_statistics(self, clips: int = 512, chunk: int = 32) -> None:
        """Feature statistics of the LQ-Formers from up to ``clips`` training clips, evenly spread,
        summed ``chunk`` clips at a time (full-size patch features are ~4 MB a clip)."""
        data = self.train_data
        positions = np.linspace(0, len(data) - 1, min(clips, len(data))).round().astype(int).tolist()
        sums = {m: [0, 0.0, 0.0] for m in ("video", "audio")}  # count, sum, sum of squares per dimension
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
                getattr(self.model, f"{m}_lqformer").set_feature_statistics(torch.as_tensor(mean), torch.as_tensor(std))

    def _lr_factor(self, step: int) -> float:
        r = self.cfg.run
        return linear_warmup_cosine_lr(step, self.total_steps, r.init_lr, r.min_lr, r.warmup_lr, r.warmup_steps) / r.init_lr

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
        run, accum = self.cfg.run, self.cfg.run.gradient_accumulation_steps
        model = self.engine or self.model
        record: dict = {}
        while self.position.epoch < run.max_epoch:
            samples_done = self.position.step_in_epoch * run.batch_size_train * accum * self.world
            self.sampler.set_epoch(self.position.epoch, samples_done)
            batches = iter(self.loader(self.train_data, self.sampler, run.batch_size_train))
            model.train()
            while self.position.step_in_epoch < self.steps_per_epoch:
                record = self._step(model, batches, accum)
                if self.position.step % run.save_every_steps == 0 and self.position.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
            record["val_loss"] = self.validate() if self.val_data else None
            self._log({"epoch": self.position.epoch, "step": self.position.step, "val_loss": record["val_loss"]})
            self.position.epoch, self.position.step_in_epoch = self.position.epoch + 1, 0
            self.save_checkpoint()
        return record

    def _step(self, model, batches, accum: int) -> dict:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step
        losses, clips, tokens = [], 0, 0
        for _ in range(accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            with self.autocast:
                loss = model(batch).loss
            if not torch.isfinite(loss):
                raise TrainError(f"loss is {loss.item()} at step {self.position.step + 1} (epoch "
                                 f"{self.position.epoch}); the last good checkpoint is kept in {self.output_dir}")
            if self.engine:
                self.engine.backward(loss)
                self.engine.step()  # steps the optimizer and the scheduler at the accumulation boundary
            else:
                (loss / accum).backward()
            losses.append(loss.item())
            clips += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        if not self.engine:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.cfg.run.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.run.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position.step += 1
        self.position.step_in_epoch += 1
        seconds = time.perf_counter() - start
        record = {"step": self.position.step, "epoch": self.position.epoch, "loss": sum(losses) / len(losses),
                  "lr": lr, "clips_per_s": clips * self.world / seconds, "tokens": tokens, "seconds": seconds}
        self._log(record)
        return record

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the val store (every ok clip once, in store order)."""
        model = self.engine or self.model
        model.eval()
        sampler = EpochSampler(self.val_data, 0, shuffle=False, rank=self.rank, world=self.world)
        total, count = 0.0, 0
        for batch in self.loader(self.val_data, sampler, self.cfg.run.batch_size_eval):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast:
                loss = model(batch).loss
            total, count = total + loss.item() * batch["input_ids"].shape[0], count + batch["input_ids"].shape[0]
        model.train()
        return total / max(count, 1)

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
        if self.rank == 0:
            self.model.save_checkpoint(partial_folder, config=self.cfg.to_dict(absolute=True))
            state = {"position": vars(self.position).copy(), "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            if not self.engine:
                state["optimizer"] = self.optimizer.state_dict()
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(state, partial_folder / STATE_FILE)
        self._barrier()
        if self.rank == 0:
            if folder.exists():
                shutil.rmtree(folder)
            partial_folder.rename(folder)  # a checkpoint exists whole or not at all
            for old in checkpoints(self.output_dir)[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old)
        self._barrier()
        return folder

    def _load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = torch.load(folder / STATE_FILE, weights_only=True)  # tensors and plain values only
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
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def cleanup(self) -> None:
        if self.rank == 0:
            self.tensorboard.close()
            if self.wandb is not None:
                self.wandb.finish()
