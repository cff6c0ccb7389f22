"""The GPU recipe, run on the CPU: bf16 in both engines, in one process and two, from every
launcher (torchrun on one node and on two, the deepspeed launcher, a SLURM-style environment),
with gradient checkpointing on; frozen weights never broadcast; an output folder every node sees.

bf16 tolerance: per-step losses of runs that do the same arithmetic in another order (another
engine, another split over ranks) agree within 2e-3 relative. One bf16 rounding is up to 4e-3
relative, but a step's loss is a fp32 sum over ~700 target tokens, each computed in bf16, so the
rounding noise averages out; what is left is measured at about 1e-4 here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import (DS_ENV, NO_DROPOUT, TORCHRUN, XMEI, free_port, losses_by_step, read_log, sets_args,
                        train_program, trained_weights, trainer)

BF16 = ("run.precision=bf16", "model.gradient_checkpointing=true", "run.max_epoch=2", "run.save_every_steps=100",
        "run.warmup_steps=1", *NO_DROPOUT)
RTOL = 2e-3  # bf16 tolerance (module docstring)


def popen(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **DS_ENV, **(env or {})})


def finish_all(procs: list[subprocess.Popen], ok: bool = True, timeout: int = 600) -> str:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    if ok:
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return "\n".join(outputs)


def nodes(program_of_node: list[list[str]]) -> list[subprocess.Popen]:
    """One torchrun per "node" (1 process each), joined by a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [popen([str(TORCHRUN), "--nnodes", str(len(program_of_node)), "--nproc_per_node", "1",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "xmei-test", *program])
            for program in program_of_node]


def slurm_tasks(program: list[str], tasks: int = 2) -> list[subprocess.Popen]:
    """``srun --ntasks N --gpus-per-task 1 xmei ...`` without a launcher: SLURM's variables, the
    rendezvous from the job script, and each task its own CUDA_VISIBLE_DEVICES."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return [subprocess.Popen(program, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={
        **base, **DS_ENV, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(tasks), "SLURM_LOCALID": str(i),
        "SLURM_NODEID": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": str(i)})
        for i in range(tasks)]


@pytest.fixture(scope="module")
def runs(tiny_models, patch_store, tmp_path_factory) -> dict[str, Path]:
    """The bf16 recipe, 6 steps of 8 samples each, five ways: {name: output folder}."""
    tmp = tmp_path_factory.mktemp("recipe")
    out = {name: tmp / name for name in ("torch_1", "deepspeed_1", "torch_2_slurm", "deepspeed_2", "torch_2_nodes")}
    one = sets_args(*BF16, "run.batch_size_train=8")
    two = sets_args(*BF16)  # batch 4 on each of 2 processes

    t = trainer(tiny_models, [patch_store], out["torch_1"], *BF16, "run.batch_size_train=8")  # in this process
    t.train()
    t.cleanup()
    finish_all([popen(train_program(tiny_models, patch_store, out["deepspeed_1"], "--engine", "deepspeed", *one))])
    finish_all(slurm_tasks(train_program(tiny_models, patch_store, out["torch_2_slurm"], *two)))
    finish_all([popen([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                       str(free_port()), str(XMEI), *train_program(tiny_models, patch_store, out["deepspeed_2"],
                                                                   "--engine", "deepspeed", *two)[1:]])])
    program = train_program(tiny_models, patch_store, out["torch_2_nodes"], *two)
    finish_all(nodes([program, program]))
    return out


def test_bf16_in_both_engines_agrees_and_learns(runs):
    torch_losses, ds_losses = losses_by_step(runs["torch_1"]), losses_by_step(runs["deepspeed_1"])
    assert sorted(torch_losses) == sorted(ds_losses) == list(range(1, 7))
    np.testing.assert_allclose([ds_losses[s] for s in range(1, 7)], [torch_losses[s] for s in range(1, 7)], rtol=RTOL)
    assert torch_losses[6] < 0.85 * torch_losses[1] and ds_losses[6] < 0.85 * ds_losses[1]


@pytest.mark.parametrize("engine, two", [("torch", "torch_2_slurm"), ("deepspeed", "deepspeed_2")])
def test_bf16_on_two_processes_equals_one_with_twice_the_batch(runs, engine, two):
    """torch: launched as SLURM tasks without a launcher; deepspeed: by `deepspeed --num_gpus 2`."""
    a, b = [r for r in read_log(runs[f"{engine}_1"]) if "loss" in r], [r for r in read_log(runs[two]) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["target_tokens"] for r in b] == [r["target_tokens"] for r in a]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=RTOL, err_msg=key)
    # the weights themselves are not compared: AdamW divides each gradient by its own running size, so
    # a weight whose gradient is near zero moves by up to lr a step whatever the bf16 noise's sign
    # (measured: up to 6e-3 apart after 6 steps); the fp32 runs of test_train compare them exactly
    wa, wb = trained_weights(runs[f"{engine}_1"]), trained_weights(runs[two])
    assert wa.keys() == wb.keys() and {w.dtype for w in [*wa.values(), *wb.values()]} == {torch.float32}


def test_master_weights_gradients_and_optimizer_state_stay_fp32(runs):
    last = "checkpoints/step_0000006"
    state = torch.load(runs["torch_1"] / last / "trainer_state.pt", weights_only=True)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    for shard in sorted((runs["deepspeed_2"] / last / "deepspeed" / "state").glob("*optim_states.pt")):
        zero = torch.load(shard, weights_only=False)["optimizer_state_dict"]
        masters = zero["single_partition_of_fp32_groups"]
        moments = [t for s in zero["base_optimizer_state"]["state"].values() for k, t in s.items() if k != "step"]
        assert masters and moments and {t.dtype for t in [*masters, *moments]} == {torch.float32}, shard


def test_two_torchrun_nodes_train_as_two_processes_on_one(runs):
    slurm, nodes_ = read_log(runs["torch_2_slurm"]), read_log(runs["torch_2_nodes"])
    for key in ("loss", "grad_norm", "target_tokens"):
        assert [r[key] for r in nodes_ if "loss" in r] == pytest.approx([r[key] for r in slurm if "loss" in r],
                                                                       rel=1e-6)


def test_nodes_that_do_not_share_the_output_folder_stop_at_start(tiny_models, patch_store, tmp_path):
    procs = nodes([train_program(tiny_models, patch_store, tmp_path / f"node{i}", *sets_args(*BF16)) for i in (0, 1)])
    output = finish_all(procs, ok=False, timeout=300)
    assert all(p.returncode != 0 for p in procs)
    assert output.count("is not shared by every rank: rank(s) 1 cannot see the file rank 0 wrote there") == 2, output
    assert "give every node the same shared --output-dir" in output
    assert not list(tmp_path.glob("node*/checkpoints"))  # stopped before any training


FROZEN_BROADCAST = """
import json, sys
import deepspeed, torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from xmei.distributed import Distributed, frozen_names, unbroadcast_frozen, weights_checksum

dist = Distributed.start("cpu")

def model():  # every rank holds other weights: the frozen layer as if read from other files
    layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    layers[0].requires_grad_(False)
    with torch.no_grad():
        for p in layers.parameters():
            p.fill_(dist.rank + 1)
    return layers

def after(layers):
    return {"frozen": layers[0].weight.sum().item(), "trainable": layers[1].weight.sum().item()}

plain, ignored, zero = model(), model(), model()
DistributedDataParallel(plain)
DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ignored, frozen_names(ignored))
DistributedDataParallel(ignored)
with unbroadcast_frozen(zero):
    deepspeed.initialize(model=zero, optimizer=torch.optim.AdamW(zero[1].parameters()), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
marked = any(hasattr(p, "ds_optim_param") for p in zero.parameters())
same = nn.Linear(8, 8).requires_grad_(False)
for p in same.parameters():
    nn.init.constant_(p, 0.5)
print(json.dumps({"rank": dist.rank, "ddp": after(plain), "ddp_ignored": after(ignored), "deepspeed": after(zero),
                  "marker_left": marked, "checksum": weights_checksum(model()), "same": weights_checksum(same)}))
"""


def test_frozen_weights_are_not_broadcast_at_start(tmp_path):
    script = tmp_path / "frozen_broadcast.py"
    script.write_text(FROZEN_BROADCAST)
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **DS_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    r0, r1 = ranks
    assert r1["ddp"]["frozen"] == r0["ddp"]["frozen"]  # the control: DDP alone broadcasts them
    for wrapped in ("ddp_ignored", "deepspeed"):
        assert r1[wrapped]["trainable"] == r0[wrapped]["trainable"], wrapped  # trainable ones still broadcast
        assert r1[wrapped]["frozen"] == 2 * r0[wrapped]["frozen"], wrapped  # each rank keeps its own
    assert not r0["marker_left"] and not r1["marker_left"]
    assert r0["checksum"] != r1["checksum"] and r0["same"] == r1["same"]  # what the trainer compares at start


def test_resume_loads_a_state_saved_on_a_gpu_onto_the_cpu(runs, tiny_models, patch_store, tmp_path):
    """A trainer state written on cuda:0 (every tensor tagged so) resumes on a machine without a
    GPU: loaded with map_location="cpu", never onto the device it was saved from."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    folder = out / "checkpoints" / "step_0000006"
    shutil.copytree(runs["torch_1"] / "checkpoints" / "step_0000006", folder)
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    tagging = [True]
    torch.serialization.register_package(-1, lambda storage: "cuda:0" if tagging[0] else None, lambda s, where: None)
    try:
        torch.save(state, folder / "trainer_state.pt")  # as if saved from the GPU
    finally:
        tagging[0] = False
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
        torch.load(folder / "trainer_state.pt", weights_only=True)
    t = trainer(tiny_models, [patch_store], out, *BF16, "run.batch_size_train=8", "run.max_epoch=3", resume=True)
    assert t.position.step == 6 and t.optimizer.state_dict()["state"]
    t.cleanup()


def test_eval_generates_in_bf16_from_a_bf16_run(runs, patch_store):
    from xmei.config import Config
    from xmei.generate import GenerationSettings, generate_store
    from xmei.model import XMEIQwen

    model = XMEIQwen.from_checkpoint(runs["torch_1"] / "checkpoints" / "step_0000006", dtype=torch.bfloat16)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.video_lqformer.parameters()} == {torch.float32}  # loaded as trained
    cfg = Config()
    rows, _ = generate_store(model, patch_store, cfg.emotions, cfg.intents,
                             GenerationSettings(max_new_tokens=40, batch_size=8))
    assert len(rows) == 24 and all(r["emotion"] in cfg.emotions.labels and r["intent"] in cfg.intents.labels
                                   for r in rows)
