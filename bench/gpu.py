"""Full-size XMEI-Qwen on one GPU with random weights: extraction clips/s (the synthetic corpus, and
camera-like 1080p/720p clips with 16 decode processes, with the GPU's utilisation), LoRA training
tokens/s under DeepSpeed ZeRO-2, peak GPU memory and evaluation (generation) clips/s, as one table.
Nothing is downloaded: the architectures come from their published configs (CLIP ViT-L/14,
HuBERT-Large, Qwen2.5-7B), initialised at random in bf16, on ``run.device``.

    bash bench/gpu.sh                       # on a GPU machine, within 8 minutes
    python bench/gpu.py --scale tiny        # the same code path on CPU with the tiny models (a check)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Published architecture numbers (the checkpoints' config.json), nothing else taken from them.
CLIP_L14 = dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                intermediate_size=4096, projection_dim=768)
HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=False)


def build_models(folder: Path, scale: str) -> Path:
    """A models folder in the layout of `xmei models tiny`; full-size encoders when scale is 'full'."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, HubertConfig, HubertModel

    from pipeline.synth import text_corpus
    from pipeline.tiny_models import build_tiny_models

    build_tiny_models(folder, seed=0, texts=text_corpus(n=200))  # tokenizers, processors, tiny models
    if scale == "full":
        dtype = torch.bfloat16
        CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14)).to(dtype).save_pretrained(folder / "visual_encoder")
        HubertModel(HubertConfig(**HUBERT_LARGE)).to(dtype).save_pretrained(folder / "audio_encoder")
    return folder


def bench_extract(cfg, annotations: Path, root: Path, out: Path) -> dict:
    """extract() in this process (the encoders on run.device, the decode processes of
    extract.decode_workers): clips/s and the GPU's mean utilisation while it ran."""
    from pipeline.extract import extract

    with GpuUtilisation() as busy:
        start = time.perf_counter()
        summary = extract(cfg, annotations, root, out, workers=0)
        seconds = time.perf_counter() - start
    return {"clips": summary.ok, "seconds": seconds, "clips_per_s": summary.ok / seconds, "gpu_busy": busy.mean}


class GpuUtilisation:
    """Samples GPU 0's utilisation (nvidia-smi, every 0.2 s) while the block runs; ``mean`` is
    a percentage, or None where there is no nvidia-smi (on CPU)."""

    def __enter__(self):
        import shutil
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if shutil.which("nvidia-smi") else None
        if self._thread:
            self._thread.start()
        return self

    def _sample(self) -> None:
        import subprocess

        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.mean = sum(self.samples) / len(self.samples) if self.samples else None


def bench_train(cfg, store: Path, scale: str, steps: int) -> dict:
    """LoRA training steps under ZeRO-2 in this process; the LLM is built from its config."""
    import deepspeed
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from stores import FeatureStore
    from xmei.data import StoreSamples, feature_facts
    from xmei.distributed import Distributed, single_process_env
    from xmei.model import XMEIQwen, XMEISettings
    from xmei.prompt import collate

    single_process_env()  # one process, no launcher
    device = Distributed.start(cfg.run.device).device
    cuda = device.type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.llama_model_path))
    caption_vocab = len(AutoTokenizer.from_pretrained(str(cfg.model.caption_tokenizer_path)))
    settings = XMEISettings.from_config(cfg, caption_vocab_size=caption_vocab, **feature_facts(FeatureStore(store)))
    if scale == "full":  # built in bf16 on the GPU directly: no 30 GB fp32 copy first
        torch.set_default_dtype(torch.bfloat16)
        with device:
            llm = Qwen2ForCausalLM(Qwen2Config(**QWEN25_7B))
        torch.set_default_dtype(torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        llm = AutoModelForCausalLM.from_pretrained(str(cfg.model.llama_model_path), device_map={"": device})
    model = XMEIQwen(settings, llm, tokenizer)  # the LQ-Formers and projections follow the LLM's device
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": cfg.run.batch_size_train, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": cuda},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-5), config=config)
    builder = settings.prompt_builder(tokenizer)
    data = StoreSamples([store], builder)
    batches = [collate(data.__getitems__([(i * cfg.run.batch_size_train + j) % len(data)
                                          for j in range(cfg.run.batch_size_train)]), tokenizer.pad_token_id)
               for i in range(steps + 1)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens, start = 0, None
    for i, batch in enumerate(batches):
        if i == 1:  # the first step (allocations, kernels) is the warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = engine(batch).loss
        engine.backward(loss)
        engine.step()
        if i >= 1:
            tokens += int(batch["attention_mask"].sum())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    eval_clips_per_s = bench_eval(cfg, engine.module, store, cuda)
    return {"steps": steps, "tokens_per_s": tokens / seconds, "seconds": seconds, "loss": float(loss),
            "eval_clips_per_s": eval_clips_per_s,
            "trainable": sum(p.numel() for p in trainable),
            "peak_gb": peak_gb}


def bench_eval(cfg, model, store: Path, cuda: bool) -> float:
    """`xmei eval`'s generation over the store (greedy, KV cache, batch_size_eval): clips/s."""
    from xmei.generate import GenerationSettings, generate_store

    settings = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, num_beams=1, batch_size=cfg.run.batch_size_eval)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # ZeRO's bf16 made the LQ-Formers bf16 too
        _, clips_per_s = generate_store(model, store, cfg.emotions, cfg.intents, settings)
    return clips_per_s


def percent(value: float | None) -> str:
    return "unavailable (no nvidia-smi)" if value is None else f"{value:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-workers", type=int, default=16, help="decode processes for the camera-like clips "
                        "(0: the cores available)")
    parser.add_argument("--camera-rounds", type=int, default=8, help="clips per camera-like file")
    args = parser.parse_args()
    if args.scale == "full" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py --scale full needs a GPU; use --scale tiny to check the code path on CPU")
    from pipeline.annotations import write_annotations
    from pipeline.decode_pool import available_cores
    from pipeline.synth import camera_corpus, synth_corpus
    from xmei.config import load_config

    with tempfile.TemporaryDirectory(prefix="xmei-gpu-") as tmp:
        tmp = Path(tmp)
        models = build_models(tmp / "models", args.scale)
        sets = ["extract.shard_size=16", "run.batch_size_train=4" if args.scale == "tiny" else "run.batch_size_train=16"]
        if args.scale == "full":  # the real model section: LQ-Former 768 wide, LoRA r64 on a 7B LLM
            sets += ["model.qformer_hidden_size=768", "model.qformer_num_heads=12", "model.qformer_intermediate_size=3072",
                     "model.lora_r=64", "model.lora_modules_to_save=[]", "model.gradient_checkpointing=true",
                     "extract.batch_size=32"]
        cfg = load_config(REPO / "configs" / "tiny.yaml", sets, models_dir=models)
        corpus = tmp / "corpus"
        synth_corpus(corpus, max(3, int(args.clips / 0.7) + 1), 0, cfg.emotions, cfg.intents)
        extraction = bench_extract(cfg, corpus / "annotations" / "train.json", corpus, tmp / "store")
        # camera-like clips (1080p / 720p H.264, 5-15 s), decoding in decode_workers processes
        decoders = args.decode_workers or available_cores()
        _, camera = camera_corpus(tmp / "camera", 8 if args.scale == "full" else 2, args.camera_rounds)
        write_annotations(tmp / "camera.json", camera)
        camera_cfg = load_config(REPO / "configs" / "tiny.yaml", [*sets, f"extract.decode_workers={decoders}"],
                                 models_dir=models)
        filmed = bench_extract(camera_cfg, tmp / "camera.json", tmp / "camera", tmp / "camera_store")
        training = bench_train(cfg, tmp / "store", args.scale, args.steps)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = [("device", device), ("scale", args.scale),
            ("extraction clips/s (CLIP + HuBERT, decode included)", f"{extraction['clips_per_s']:.1f}"),
            (f"camera-like extraction clips/s ({decoders} decode processes, {filmed['clips']} clips)",
             f"{filmed['clips_per_s']:.1f}"),
            ("GPU utilisation during camera-like extraction", percent(filmed["gpu_busy"])),
            ("LoRA training tokens/s (ZeRO-2, bf16)", f"{training['tokens_per_s']:.0f}"),
            ("training step s", f"{training['seconds'] / training['steps']:.2f}"),
            ("trainable parameters", f"{training['trainable']:,}"),
            ("peak GPU memory GiB (training)", f"{training['peak_gb']:.1f}"),
            ("eval clips/s (greedy generation, KV cache)", f"{training['eval_clips_per_s']:.2f}"),
            ("last loss", f"{training['loss']:.3f}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
