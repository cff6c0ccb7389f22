"""The device policy and the launcher's variables (the collectives are exercised by the
2-process training and evaluation tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from xmei.distributed import DeviceError, launcher_env, resolve_device, resolve_precision, single_process_env

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_policy_with_gpus(monkeypatch):
    gpus(monkeypatch, 4)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda:2")  # the local rank's GPU
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda:3")
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda:1")
    assert resolve_device("cpu", local_rank=2) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"'cuda:4': this machine has 4 GPU\(s\) visible"):
        resolve_device("cuda:4")
    with pytest.raises(DeviceError, match="this is local rank 5"):
        resolve_device("cuda", local_rank=5)
    with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="expected cuda:N"):
        resolve_device("cuda:x")


def test_auto_never_puts_one_rank_of_many_on_the_cpu(monkeypatch):
    gpus(monkeypatch, 4)
    assert resolve_device("auto", local_rank=3, world=8) == torch.device("cuda:3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(DeviceError, match=r"LOCAL_RANK 5 of 8 processes, but it sees 4 GPU\(s\) "
                                          r"\(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        resolve_device("auto", local_rank=5, world=8)  # it fell back to the CPU: gloo there, NCCL elsewhere, a hang
    gpus(monkeypatch, 1)  # srun --gpus-per-task=1: each rank sees its own GPU only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert resolve_device("auto", local_rank=5, world=8) == torch.device("cuda:0")
    assert resolve_device("cuda", local_rank=5, world=8) == torch.device("cuda:0")
    gpus(monkeypatch, 0)  # no rank sees a GPU: all on the CPU (gloo)
    assert resolve_device("auto", local_rank=5, world=8) == torch.device("cpu")


def test_device_policy_without_gpus(monkeypatch):
    gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"0 GPU\(s\)"):
        resolve_device("cuda")


def test_precision_means_the_same_on_every_device(monkeypatch):
    run = lambda precision, amp=True: SimpleNamespace(precision=precision, amp=amp)  # noqa: E731
    gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert resolve_precision(run("auto"), gpu) == torch.bfloat16 and resolve_precision(run("auto"), cpu) == torch.float32
    assert resolve_precision(run("bf16"), gpu) == resolve_precision(run("bf16"), cpu) == torch.bfloat16
    assert resolve_precision(run("fp32"), gpu) == resolve_precision(run("auto", amp=False), gpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert resolve_precision(run("auto"), gpu) == torch.float32
    with pytest.raises(DeviceError, match="Tesla V100 has no bf16"):
        resolve_precision(run("bf16"), gpu)


def test_a_slurm_job_without_a_launcher_gets_its_ranks_from_slurm(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    monkeypatch.setattr(os, "environ", {**env, **slurm})
    with pytest.raises(DeviceError, match="needs MASTER_ADDR and MASTER_PORT set in the job script"):
        launcher_env()
    os.environ.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    assert launcher_env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert single_process_env() == {}  # a job of several tasks is no single process
    monkeypatch.setattr(os, "environ", {**env, **slurm, "RANK": "0", "WORLD_SIZE": "2"})
    assert launcher_env() == {}  # a launcher inside the job (srun torchrun ...) wins
    monkeypatch.setattr(os, "environ", {**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert launcher_env() == {}  # one task: one process


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    result = CliRunner().invoke(app, ["--local_rank=3", "train", "--help"])
    assert result.exit_code == 0 and "--output-dir" in result.output and os.environ["LOCAL_RANK"] == "3"


def test_single_process_env_sets_only_what_no_launcher_set(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    monkeypatch.setattr(os, "environ", {**env, "MASTER_ADDR": "127.0.0.2"})  # nothing leaks into later tests
    values = single_process_env()
    assert set(values) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.2")
    assert single_process_env() == {}  # an earlier call's (or a launcher's) variables are kept
    del os.environ["MASTER_PORT"]
    assert set(single_process_env()) == {"MASTER_PORT"}  # one process: whatever is missing is filled in
    monkeypatch.setattr(os, "environ", {**env, "RANK": "1", "WORLD_SIZE": "2"})
    assert single_process_env() == {} and "MASTER_ADDR" not in os.environ  # several processes: the launcher's business


def test_the_model_is_built_on_its_device(tiny_models):
    from conftest import config
    from xmei.model import XMEIQwen, XMEISettings

    cfg = config(tiny_models)
    facts = dict(visual_size=64, audio_size=64, num_frames=8, num_audio_clips=8, caption_tokens=16)
    model = XMEIQwen(XMEISettings.from_config(cfg, caption_vocab_size=30522, **facts), device="cpu")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert model.llm.get_input_embeddings().weight.dtype == torch.float32


def test_a_device_this_machine_lacks_is_a_clear_error(tiny_models, patch_store, tmp_path):
    xmei = Path(sys.executable).parent / "xmei"
    for device, expected in (("cuda:3", "device 'cuda:3': this machine has 0 GPU(s) visible"),
                             ("gpu", "run.device: 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'")):
        proc = subprocess.run([str(xmei), "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--models",
                               str(tiny_models), "--store", str(patch_store), "--output-dir", str(tmp_path / device),
                               "--set", f"run.device={device}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
