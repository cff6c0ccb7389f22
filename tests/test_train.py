"""Stage 2 training on cached features: data order, the loop, checkpoints, exact resume, engines."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config, store_in_dtype
from stores import FeatureStore
from xmei.data import StoreSamples
from xmei.schedule import linear_warmup_cosine_lr
from xmei.train import Trainer, TrainError, TrainWarning, target_tokens

ROOT = Path(__file__).resolve().parents[1]
XMEI = Path(sys.executable).parent / "xmei"
SMALL = ("run.batch_size_train=4", "run.batch_size_eval=8", "run.num_workers=0", "run.warmup_steps=3",
         "run.init_lr=2e-3", "run.min_lr=1e-4", "run.warmup_lr=1e-5")


# ----------------------------------------------------------------------------- data

def test_dataloader_workers_give_the_same_batches(tiny_models, patch_store, tmp_path):
    t = trainer(tiny_models, [patch_store], tmp_path / "a", "run.max_epoch=1")
    t.sampler.set_epoch(2)
    alone = list(t.loader(t.train_data, t.sampler, 4))
    t.cfg.run.num_workers = 2  # the tokenizer and the reads run in two worker processes
    in_workers = list(t.loader(t.train_data, t.sampler, 4))
    assert len(alone) == len(in_workers) == 6
    for a, b in zip(alone, in_workers):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- the loop

def trainer(tiny_models, stores, out: Path, *sets: str, val=None, **kw) -> Trainer:
    cfg = config(tiny_models, *SMALL, *sets)
    t = Trainer(cfg, stores, val, out, **kw)
    t.setup()
    return t


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def test_training_learns_logs_and_checkpoints(tiny_models, patch_store, tmp_path):
    out = tmp_path / "run"
    t = trainer(tiny_models, [patch_store], out, "run.max_epoch=5", "run.save_every_steps=4",
                "run.keep_checkpoints=2", val=patch_store)
    t.train()
    t.cleanup()
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))  # 24 clips / 4 = 6 steps, 5 epochs
    assert all(0 <= r["data_wait"] <= 1 and r["grad_norm"] > 0 for r in steps)  # share of the step spent waiting for data
    assert np.mean([r["loss"] for r in steps[-3:]]) < 0.6 * np.mean([r["loss"] for r in steps[:3]])
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 5 and vals[4] < vals[0]
    for r in steps:  # the schedule really runs: warm-up, then cosine down to min_lr
        assert r["lr"] == pytest.approx(linear_warmup_cosine_lr(r["step"] - 1, 30, 2e-3, 1e-4, 1e-5, 3))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000028", "step_0000030"]  # the last two of 4, 6, 8, 12, ..., 28, 30
    last = out / "checkpoints" / "step_0000030"
    for name in ("trainable.safetensors", "adapter/adapter_model.safetensors", "xmei_model.json", "config.yaml",
                 "trainer_state.pt"):
        assert (last / name).is_file(), name
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_feature_statistics_come_from_the_training_clips(tiny_models, patch_store, tmp_path):
    t = trainer(tiny_models, [patch_store], tmp_path / "run", "run.max_epoch=1")
    store = FeatureStore(patch_store)
    video = store.array("visual")[:].astype(np.float64).reshape(-1, 64)
    audio = store.array("audio")[:][store.array("has_audio")[:] == 1].astype(np.float64).reshape(-1, 64)
    for lqformer, features in ((t.model.video_lqformer, video), (t.model.audio_lqformer, audio)):
        np.testing.assert_allclose(lqformer.feature_mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lqformer.feature_std.numpy(), features.std(0, ddof=1), rtol=1e-4, atol=1e-7)


def test_stores_of_other_compute_dtypes_are_warned_of_and_the_model_keeps_its_own(tiny_models, patch_store,
                                                                                    tmp_path):
    made = FeatureStore(patch_store).attrs["compute_dtype"]  # float32 on the CPU
    other = "float16" if made != "float16" else "bfloat16"
    val = store_in_dtype(patch_store, tmp_path / "other", other)
    with pytest.warns(TrainWarning, match="features computed by the encoders in different dtypes") as caught:
        t = trainer(tiny_models, [patch_store], tmp_path / "run", "run.max_epoch=1", val=val)
    said = " ".join(str(w.message) for w in caught)
    assert f"{other} in {val}" in said and f"{made} in {patch_store}" in said
    assert t.model.settings.features.compute_dtype == made  # the training stores': what eval compares with


def test_gradient_accumulation_counts_optimizer_steps(tiny_models, patch_store, tmp_path):
    t = trainer(tiny_models, [patch_store], tmp_path / "run", "run.max_epoch=1", "run.gradient_accumulation_steps=3",
                "run.batch_size_train=2")
    t.train()
    steps = [r for r in read_log(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 24 clips / (2 x 3) per step
    assert t.scheduler.last_epoch == 4  # the schedule advanced once per optimizer step


def test_a_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny_models, patch_store, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, *poisoned_run(tmp_path, 0, tiny_models, patch_store, out, "run.max_epoch=2",
                                                         "run.save_every_steps=2")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3 and "rank 0 stopped: loss is nan at step 3 (epoch 0)" in proc.stdout, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert Trainer(config(tiny_models, *SMALL), [patch_store], None, out, resume=True)  # resumable from it


def test_a_partial_checkpoint_is_never_resumed_from(tmp_path):
    from xmei.train import checkpoints

    for name in ("step_0000002", "step_0000004", "step_0000006.partial"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000002", "step_0000004"]


def test_output_dir_with_checkpoints_needs_resume(tiny_models, patch_store, tmp_path):
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    with pytest.raises(TrainError, match="pass --resume"):
        Trainer(config(tiny_models), [patch_store], None, tmp_path)
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        Trainer(config(tiny_models), [patch_store], None, tmp_path / "empty", resume=True)
    with pytest.raises(TrainError, match="wandb is not installed"):
        Trainer(config(tiny_models, "run.use_wandb=true"), [patch_store], None, tmp_path / "w")


# ----------------------------------------------------------------------------- exact resume, engines

def train_program(tiny_models: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return [str(XMEI), "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--models", str(tiny_models),
            "--store", str(store), "--output-dir", str(out), *[a for s in SMALL for a in ("--set", s)], *extra]


def cli_train(tiny_models: Path, store: Path, out: Path, *extra: str, env=None, **popen):
    args = train_program(tiny_models, store, out, *extra)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, **popen)


def finish(proc, timeout=600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


def losses_by_step(out: Path) -> dict[int, float]:
    """The last logged loss of each step (a killed run may have logged steps that were redone)."""
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def test_a_killed_run_resumes_to_the_same_losses(tiny_models, patch_store, tmp_path):
    sets = ("--set", "run.max_epoch=4", "--set", "run.save_every_steps=3")
    finish(cli_train(tiny_models, patch_store, tmp_path / "whole", *sets))
    out = tmp_path / "killed"
    proc = cli_train(tiny_models, patch_store, out, *sets, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "checkpoints" / "step_0000009").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-epoch 1 (6 steps an epoch), after the step-9 checkpoint
    proc.wait()
    done = max(r["step"] for r in read_log(out) if "loss" in r)
    assert done < 24, "the kill came too late"
    output = finish(cli_train(tiny_models, patch_store, out, *sets, "--resume"))
    assert "done: 24 steps" in output
    whole, resumed = losses_by_step(tmp_path / "whole"), losses_by_step(out)
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == whole  # exactly the same per-step losses


def test_a_whole_llm_run_resumes_to_the_same_llm(tiny_models, patch_store, tmp_path):
    """model.use_lora false: the LLM trains whole, and --resume restores it from the checkpoint's llm/."""
    from safetensors.torch import load_file

    out, sets = tmp_path / "run", ("model.use_lora=false", "run.max_epoch=1", "run.iters_per_epoch=2",
                                   "run.save_every_steps=1", "run.warmup_steps=0", "run.keep_checkpoints=2")
    t = trainer(tiny_models, [patch_store], out, *sets)
    t.train()  # 2 steps, checkpoints at steps 1 and 2
    t.cleanup()
    whole = (out / "checkpoints" / "step_0000002").rename(tmp_path / "whole")  # as if killed before step 2's
    t = trainer(tiny_models, [patch_store], out, *sets, resume=True)
    t.train()  # step 2 again, from step 1's checkpoint
    t.cleanup()
    losses = [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]
    assert len(losses) == 3 and losses[2] == losses[1]  # the same loss as the uninterrupted run
    resumed = load_file(out / "checkpoints" / "step_0000002" / "llm" / "model.safetensors")
    uninterrupted = load_file(whole / "llm" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DS_ENV = {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}


def test_deepspeed_zero2_on_cpu_in_one_process_and_resume(tiny_models, patch_store, tmp_path):
    env = {**DS_ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(free_port())}
    out = tmp_path / "ds"
    finish(cli_train(tiny_models, patch_store, out, "--engine", "deepspeed", "--set", "run.max_epoch=2",
                     "--set", "run.save_every_steps=100", env=env))
    losses = losses_by_step(out)
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]
    state = out / "checkpoints" / "step_0000012"
    assert (state / "adapter" / "adapter_model.safetensors").is_file() and (state / "deepspeed" / "state").is_dir()
    env["MASTER_PORT"] = str(free_port())
    output = finish(cli_train(tiny_models, patch_store, out, "--engine", "deepspeed", "--set", "run.max_epoch=3",
                              "--set", "run.save_every_steps=100", "--resume", env=env))
    assert "done: 18 steps" in output and sorted(losses_by_step(out)) == list(range(1, 19))


# ----------------------------------------------------------------------------- many processes

TORCHRUN = Path(sys.executable).parent / "torchrun"
NO_DROPOUT = ("model.lora_dropout=0",)  # tiny.yaml has no LQ-Former dropout: runs differ only by their data split


def sets_args(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def torchrun(nproc: int, program: list[str], timeout: int = 600, env: dict | None = None):
    """(finished process, wall seconds) of ``program`` on ``nproc`` gloo processes."""
    args = [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), *program]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **DS_ENV, **(env or {})},
                          timeout=timeout)
    return proc, time.monotonic() - start


def trained_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trainable weights (LQ-Formers, projections, adapter) of a run's last checkpoint."""
    from safetensors.torch import load_file

    last = sorted((out / "checkpoints").iterdir())[-1]
    return {**load_file(last / "trainable.safetensors"), **load_file(last / "adapter" / "adapter_model.safetensors")}


TWO_PROCESSES = ("run.max_epoch=1", "run.save_every_steps=100", "run.warmup_steps=1", *NO_DROPOUT)


def two_process_program(tiny_models: Path, store: Path, out: Path, engine: str, *extra: str) -> list[str]:
    """The run of the two-process tests: 3 steps of 2 x 4 clips, validation on ``store``."""
    return train_program(tiny_models, store, out, "--engine", engine, "--val-store", str(store),
                         *sets_args(*TWO_PROCESSES), *extra)


@pytest.fixture(scope="module")
def two_processes(tiny_models, patch_store, tmp_path_factory):
    """engine -> the folder of an uninterrupted two-process run, made on first use."""
    made = {}

    def run(engine: str) -> Path:
        if engine not in made:
            out = tmp_path_factory.mktemp(f"two_{engine}") / "run"
            proc, _ = torchrun(2, two_process_program(tiny_models, patch_store, out, engine))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            made[engine] = out
        return made[engine]

    return run


def assert_same_weights(a: Path, b: Path, where: str) -> None:
    """The last checkpoints of runs ``a`` and ``b`` hold the same trainable weights, bit for bit."""
    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys(), where
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=f"{where}: {key}")


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_two_processes_train_exactly_as_one_with_twice_the_batch(engine, tiny_models, patch_store, two_processes,
                                                                 tmp_path):
    # one process, no launcher (DeepSpeed included: it sets the rank variables itself), batch 8
    one, two = tmp_path / "one", two_processes(engine)
    finish(cli_train(tiny_models, patch_store, one, "--engine", engine, "--val-store", str(patch_store),
                     *sets_args(*TWO_PROCESSES, "run.batch_size_train=8"), env={"DS_ACCELERATOR": "cpu"}))
    a, b = [r for r in read_log(one) if "loss" in r], [r for r in read_log(two) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]  # 24 clips / 8 a step
    for key in ("loss", "grad_norm"):  # AdamW hides a gradient's scale; its norm does not
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, err_msg=key)
    assert [r["target_tokens"] for r in b] == [r["target_tokens"] for r in a]
    val = [[r["val_loss"] for r in read_log(out) if "val_loss" in r] for out in (one, two)]
    assert len(val[0]) == 1 and val[1] == pytest.approx(val[0], rel=1e-5)  # each rank 12 clips, token-weighted sums
    wa, wb = trained_weights(one), trained_weights(two)
    assert wa.keys() == wb.keys()
    for key in wa:  # float noise only: a step moves weights by up to lr = 2e-3
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=3e-5, msg=key)
    state = torch.load(two / "checkpoints" / "step_0000003" / "trainer_state.pt", weights_only=True)
    assert state["shape"] == {"world": 2, "batch_size_train": 4, "gradient_accumulation_steps": 1}
    assert len(state["rng"]) == 2  # each rank's RNG
    if engine == "deepspeed":  # each rank wrote its share of the ZeRO-2 optimizer state
        assert len(list((two / "checkpoints" / "step_0000003" / "deepspeed" / "state").glob("*optim_states.pt"))) == 2


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly(tiny_models, patch_store, two_processes,
                                                                        tmp_path):
    """Rank 1 alone gets SIGTERM (the trainer's test hook, xmei.preempt) after a step drawn from a
    seeded generator; rank 0 stops at the same step (after step 3, before the validation). The
    command rank 0 prints, under torchrun again, then gives the uninterrupted run's losses,
    validation loss and weights."""
    step = int(np.random.default_rng([23, 4]).integers(1, 4))
    where = f"SIGTERM to rank 1 after step {step} of 3"
    out = tmp_path / "run"
    proc, _ = torchrun(2, two_process_program(tiny_models, patch_store, out, "torch"),
                       env={"XMEI_TEST_SIGNAL": f"SIGTERM:{step}:1"})
    said = re.sub(r"\s+", " ", proc.stdout + proc.stderr)
    assert proc.returncode != 0 and "exitcode : 143" in said, f"{where}: {said[-3000:]}"
    assert not re.search(r"\[rank\d\]: Traceback", said), f"{where}: {said[-3000:]}"  # torchrun's is its report
    checkpoint = out / "checkpoints" / f"step_{step:07d}"
    assert (f"stopped by SIGTERM (sent to 1 of 2 ranks) after step {step} (epoch 0); the checkpoint {checkpoint} "
            "is whole") in said, f"{where}: {said[-3000:]}"
    assert f"rank 1: stopped by SIGTERM after step {step}" in said, f"{where}: {said[-3000:]}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint.name], where
    resume = shlex.split(re.search(r"To resume from it: (.*) \(under the same launcher", said).group(1))
    assert resume[0] == "xmei" and resume[-1] == "--resume", f"{where}: {resume}"
    proc, _ = torchrun(2, [str(XMEI), *resume[1:]])
    assert proc.returncode == 0, f"{where}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    whole = two_processes("torch")
    assert losses_by_step(out) == losses_by_step(whole), where
    validation = [[r["val_loss"] for r in read_log(run) if "val_loss" in r] for run in (whole, out)]
    assert len(validation[0]) == 1 and validation[1] == validation[0], where  # none before the stop
    assert_same_weights(out, whole, where)


def test_micro_batches_weigh_each_target_token_as_one_batch_does(tiny_models, patch_store, tmp_path):
    """Accumulating 2 x 4 gives the gradient of one batch of 8, though the two micro-batches hold
    different numbers of target tokens (a mean of their means would weigh tokens unequally)."""
    grads, losses = {}, {}
    for name, sets in (("one", ("run.batch_size_train=8",)),
                       ("accumulated", ("run.batch_size_train=4", "run.gradient_accumulation_steps=2"))):
        t = trainer(tiny_models, [patch_store], tmp_path / name, "run.max_epoch=1", "run.max_grad_norm=0",
                    "run.warmup_steps=0.5", *NO_DROPOUT, *sets)
        assert t.warmup_steps == 2  # half of the run's 3 steps, rounded
        t.optimizer.step = t.optimizer.zero_grad = lambda *a, **k: None  # keep the first step's gradients
        t.sampler.set_epoch(0)
        batches = list(t.loader(t.train_data, t.sampler, t.cfg.run.batch_size_train))
        losses[name] = t._step(t.model, iter(batches))["loss"]
        params = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
        grads[name] = {n: p.grad for n, p in params.items()}
        if name == "accumulated":  # what a mean of the micro-batches' means would give
            counts = [target_tokens(b["labels"]) for b in batches[:2]]
            means = torch.autograd.grad(sum(t.model(b).loss for b in batches[:2]) / 2, list(params.values()),
                                        allow_unused=True)
    assert counts[0] != counts[1]
    assert losses["accumulated"] == pytest.approx(losses["one"], rel=1e-5)
    assert grads["one"].keys() == grads["accumulated"].keys()
    for key in grads["one"]:
        torch.testing.assert_close(grads["accumulated"][key], grads["one"][key], rtol=1e-4, atol=1e-7, msg=key)
    naive = torch.cat([g.flatten() for g in means if g is not None])
    exact = torch.cat([g.flatten() for g, m in zip(grads["one"].values(), means) if m is not None])
    assert not torch.allclose(naive, exact, rtol=1e-3, atol=1e-7)  # the test tells the two apart


POISONED_RUN = """
import sys
from pathlib import Path
from xmei.config import load_config
from xmei.train import Trainer, TrainError

rank, config, models, store, out, *sets = sys.argv[1:]
t = Trainer(load_config(config, sets, models_dir=models), [Path(store)], None, Path(out))
t.setup()
if t.rank == int(rank):  # a non-finite loss on this rank only, from the third step on
    forward = t.model.forward
    def poisoned(batch, **kwargs):
        result = forward(batch, **kwargs)
        if t.position.step >= 2:
            result.loss = result.loss * float("nan")
        return result
    t.model.forward = poisoned
try:
    t.train()
except TrainError as e:
    print(f"rank {t.rank} stopped: {e}", flush=True)
    sys.exit(3)
finally:
    t.cleanup()
"""


def poisoned_run(folder: Path, rank: int, tiny_models: Path, store: Path, out: Path, *sets: str) -> list[str]:
    """A training script whose loss turns NaN on ``rank`` from step 3 on, and its arguments."""
    script = folder / "poisoned_run.py"
    script.write_text(POISONED_RUN)
    return [str(script), str(rank), str(ROOT / "configs" / "tiny.yaml"), str(tiny_models), str(store), str(out),
            *SMALL, *sets]


def test_a_nan_on_one_rank_stops_every_rank_at_once(tiny_models, patch_store, tmp_path):
    out = tmp_path / "run"
    proc, seconds = torchrun(2, poisoned_run(tmp_path, 1, tiny_models, patch_store, out, "run.max_epoch=2",
                                             "run.save_every_steps=1"))
    assert proc.returncode != 0
    for rank in (0, 1):  # both ranks stop on the same step with the same error, none waits for the other
        assert f"rank {rank} stopped: loss is nan at step 3 (epoch 0)" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert seconds < 240  # start-up included; a rank left waiting would hang until gloo's 30-minute timeout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]  # the good ones


def test_resume_with_another_batch_is_refused_or_goes_on_from_the_same_sample(tiny_models, patch_store, tmp_path):
    out = tmp_path / "run"
    t = trainer(tiny_models, [patch_store], out, "run.max_epoch=1", "run.save_every_steps=3")
    t.train()  # batch 4: 6 steps of 4, a checkpoint at step 3 (12 samples) and at the end
    t.cleanup()
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # as if killed after step 5
    logged = len(read_log(out))
    cfg = config(tiny_models, *SMALL, "run.max_epoch=1", "run.batch_size_train=6")
    with pytest.raises(TrainError, match=r"1 process\(es\) x batch 4 x accumulation 1 = 4 samples a step; this run "
                                         r"has 1 process\(es\) x batch 6 .* \(batch_size_train 4 -> 6\)\. .*--rebatch"):
        Trainer(cfg, [patch_store], None, out, resume=True).setup()
    t = Trainer(cfg, [patch_store], None, out, resume=True, rebatch=True)
    t.setup()
    assert (t.position.samples, t.position.samples_in_epoch, t.position.step) == (12, 12, 2)  # 12 samples = 2 steps of 6
    t.train()
    t.cleanup()
    resumed = [r for r in read_log(out)[logged:] if "loss" in r]
    assert [(r["step"], r["samples"]) for r in resumed] == [(3, 18), (4, 24)]  # samples 12-23 of the epoch, once
    for r in resumed:  # the schedule of a 4-step run, at the step the samples seen make
        assert r["lr"] == pytest.approx(linear_warmup_cosine_lr(r["step"] - 1, 4, 2e-3, 1e-4, 1e-5, 3))


def test_a_store_without_audio_trains_a_video_model(tiny_models, patch_store, tmp_path):
    """The V+T ablation on a store that has no audio features at all; an A+V+T model refuses it."""
    import shutil

    import zarr

    store = tmp_path / "video_only"
    shutil.copytree(patch_store, store)
    shutil.rmtree(store / "audio")
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    group.attrs["features"] = {k: v for k, v in group.attrs["features"].items() if k != "audio"}
    out = tmp_path / "run"
    t = trainer(tiny_models, [store], out, "run.max_epoch=1", "model.modalities=[video]")
    t.train()
    assert set(t.model.trainable_modules()) == {"video_lqformer", "video_proj"}
    assert np.isfinite([r["loss"] for r in read_log(out) if "loss" in r]).all()
    with pytest.raises(ValueError, match="no audio features, which model.modalities"):
        trainer(tiny_models, [store], tmp_path / "other", "run.max_epoch=1")


def test_caption_dropout_hides_a_share_of_descriptions_the_same_way_every_time(tiny_models, patch_store):
    data = StoreSamples([patch_store])
    data.hide_captions(0.5, seed=3)
    hidden = [[not s[f"{m}_caption_mask"].any() for m in ("video", "audio")] for s in data.__getitems__(range(24))]
    assert 8 <= sum(h for row in hidden for h in row) <= 40  # about half of 48
    again = StoreSamples([patch_store])
    again.hide_captions(0.5, seed=3)
    assert [[not s[f"{m}_caption_mask"].any() for m in ("video", "audio")]
            for s in again.__getitems__(range(24))] == hidden  # a function of (seed, epoch, position)
    again.epoch = 1
    assert [[not s[f"{m}_caption_mask"].any() for m in ("video", "audio")]
            for s in again.__getitems__(range(24))] != hidden
