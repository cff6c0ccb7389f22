"""Explanation metrics: generated explanations scored against the reference explanations.

Six corpus-level numbers, as the published tables report them:

- ``bleu4``, ``meteor``, ``rouge_l``, ``cider_d``: pycocoevalcap (the coco-caption code). Both
  sides are tokenized first with its PTBTokenizer (Stanford CoreNLP 3.4.1, Java; lower-cased,
  punctuation dropped), as coco-caption does. BLEU-4 is the 4th value of ``Bleu(4)`` (corpus
  BLEU, closest reference length for the brevity penalty); METEOR is the METEOR 1.5 jar that
  pycocoevalcap ships (``-l en -norm``; its corpus score comes from pooled statistics, not the
  mean of sentence scores); ROUGE-L is the mean sentence LCS F-measure with beta 1.2; CIDEr-D is
  pycocoevalcap's ``Cider`` (coco-caption's CIDEr-D: clipped tf-idf n-grams 1-4, Gaussian length
  penalty sigma 6, times 10; idf comes from the references of this very corpus, so a corpus of
  one clip always scores 0).
- ``bertscore``: mean F1 of bert-score with a local model folder (``eval.bertscore_model``) at
  layer ``eval.bertscore_layer``, idf off. With ``eval.bertscore_rescale`` the baseline file of
  bert-score is found by the folder's name or its config's ``_name_or_path`` (roberta-large ->
  rescale_baseline/en/roberta-large.tsv) and named in the result as ``"baseline"``.
- ``bleurt``: mean raw score of a converted PyTorch BLEURT checkpoint (:mod:`xmei.bleurt`).

Each metric is ``{"value": float, "per_clip": [float, ...]}`` or ``{"unavailable": reason}`` when its
package, model folder, jar or Java is missing or unset (or the folder cannot be loaded); the others are
computed all the same. ``per_clip`` holds each clip's own score from the same computation: the
sentence BLEU-4 and METEOR of the clip, its ROUGE-L, CIDEr-D (with the corpus's idf), BERTScore F1
and BLEURT; the corpus value is their mean for the last four, not for BLEU-4 and METEOR, whose
corpus scores pool the statistics of all clips.
Without Java, BLEU/ROUGE-L/CIDEr-D fall back to a plain tokenization (lower case, punctuation
stripped) and say so with ``"tokenizer": "simple (java missing)"``; METEOR is then unavailable.
Bad inputs (different lengths, nothing to score, non-strings) raise.

    explanation_metrics(refs, cands, cfg.eval)["bleu4"]  # {"value": 0.123, "per_clip": [0.0, 0.31, ...]}
"""
from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from xmei.errors import UserError, read_json

__all__ = ["METRICS", "explanation_metrics", "simple_tokenize"]

METRICS = ("bleu4", "meteor", "rouge_l", "cider_d", "bertscore", "bleurt")
COCO_METRICS = METRICS[:4]  # pycocoevalcap's
SIMPLE_JAVA_MISSING = "simple (java missing)"


def explanation_metrics(references: list[str], candidates: list[str], eval_cfg) -> dict[str, dict]:
    """The six explanation metrics of ``candidates`` against ``references`` (one reference per
    candidate, in order), keyed as :data:`METRICS`. ``eval_cfg`` is an :class:`xmei.config.EvalConfig`."""
    references, candidates = _check_inputs(references, candidates)
    results: dict[str, dict] = dict(coco_metrics(references, candidates))
    results["bertscore"] = bertscore_metric(references, candidates, eval_cfg)
    results["bleurt"] = bleurt_metric(references, candidates, eval_cfg)
    return {name: results[name] for name in METRICS}


# --- coco-caption metrics ---------------------------------------------------------------------

def coco_metrics(references: list[str], candidates: list[str]) -> dict[str, dict]:
    """BLEU-4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap, on PTB-tokenized text."""
    missing = _missing_package("pycocoevalcap")
    if missing:  # e.g. a GPU machine given the project's wheels without this 104 MB one (bench/gpu.sh)
        return {name: {"unavailable": missing} for name in COCO_METRICS}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    java = shutil.which("java")
    gts, res, tokenizer_note = _tokenize(references, candidates, java)
    extra = {"tokenizer": tokenizer_note} if tokenizer_note else {}

    bleu, bleu_clips = Bleu(4).compute_score(gts, res, verbose=0)  # BLEU-1..4, corpus and per clip
    rouge, rouge_clips = Rouge().compute_score(gts, res)
    if any(ref.split() for refs in gts.values() for ref in refs):
        cider, cider_clips = Cider().compute_score(gts, res)
    else:  # no reference n-gram at all: every tf-idf vector is empty (pycocoevalcap would fail on max())
        cider, cider_clips = 0.0, [0.0] * len(gts)
    return {"bleu4": _metric(bleu[3], bleu_clips[3], **extra), "meteor": _meteor(gts, res, java),
            "rouge_l": _metric(rouge, rouge_clips, **extra), "cider_d": _metric(cider, cider_clips, **extra)}


def _metric(value, per_clip, **extra) -> dict:
    return {"value": float(value), "per_clip": [float(v) for v in per_clip], **extra}


def simple_tokenize(text: str) -> str:
    """The fallback tokenization without Java: lower case, every punctuation character (Unicode
    category P*) replaced by a space, whitespace collapsed. PTB splits more finely ("it's" ->
    "it 's", where this gives "it s"), so numbers differ slightly from the PTB ones."""
    lowered = text.lower()
    return " ".join("".join(" " if unicodedata.category(c).startswith("P") else c for c in lowered).split())


def _tokenize(references: list[str], candidates: list[str], java: str | None):
    """coco-style {index: [tokenized]} for references and candidates, and the fallback note
    (None when the PTB tokenizer ran)."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    # One line per sentence: the jar reads lines, and a \r, \u2028, \x0b ... inside a sentence
    # would shift every later sentence onto the wrong clip. Collapsing whitespace changes no token.
    gts = {i: [{"caption": " ".join(text.split())}] for i, text in enumerate(references)}
    res = {i: [{"caption": " ".join(text.split())}] for i, text in enumerate(candidates)}
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    if java is None:
        note = SIMPLE_JAVA_MISSING
    elif not jar.is_file():
        note = f"simple (PTB tokenizer jar {jar} missing)"
    else:
        # one run of the jar for both sides (a JVM start each otherwise); lines are tokenized alone
        both = {**{("ref", i): v for i, v in gts.items()}, **{("cand", i): v for i, v in res.items()}}
        try:
            tokenized = ptbtokenizer.PTBTokenizer().tokenize(both)
        except OSError as err:  # e.g. its temporary file cannot be written next to the jar
            note = f"simple (PTB tokenizer failed: {err})"
        else:
            if set(tokenized) == set(both) and all(len(v) == 1 for v in tokenized.values()):
                return ({i: tokenized[("ref", i)] for i in gts}, {i: tokenized[("cand", i)] for i in res}, None)
            # a Java that runs but does not tokenize (it answered too few lines): as if it were missing
            note = (f"simple (PTB tokenizer failed: {sum(map(len, tokenized.values()))} lines back for "
                    f"{len(both)} sentences)")
    return ({i: [simple_tokenize(v[0]["caption"])] for i, v in gts.items()},
            {i: [simple_tokenize(v[0]["caption"])] for i, v in res.items()}, note)


def _meteor(gts: dict, res: dict, java: str | None) -> dict:
    from pycocoevalcap.meteor import meteor as meteor_module

    if java is None:
        return {"unavailable": "java not found on PATH: METEOR 1.5 needs Java"}
    jar = Path(meteor_module.__file__).parent / meteor_module.METEOR_JAR
    if not jar.is_file():
        return {"unavailable": f"METEOR 1.5 jar {jar} is missing"}
    # "|||" separates fields in the jar's protocol; pycocoevalcap strips it from hypotheses only.
    gts = {i: [ref.replace("|||", "") for ref in refs] for i, refs in gts.items()}
    try:
        scorer = meteor_module.Meteor()
    except OSError as err:
        return {"unavailable": f"METEOR 1.5 could not start Java: {err}"}
    try:
        value, per_clip = scorer.compute_score(gts, res)
    except (OSError, ValueError) as err:  # the JVM died or answered nothing (e.g. no memory for -Xmx2G)
        return {"unavailable": f"METEOR 1.5 failed: {err!r}"}
    finally:
        if scorer.lock.locked():  # a failure leaves it held, and Meteor.__del__ would wait on it forever
            scorer.lock.release()
        del scorer  # Meteor.__del__ closes the pipe and ends the JVM
    return _metric(value, per_clip)


def _missing_package(name: str) -> str | None:
    """Why the package ``name`` cannot be used, or None when it imports."""
    try:
        importlib.import_module(name)
    except ImportError as err:
        return f"{name} is not installed ({err})"
    return None


def _local_folder(key: str, given) -> tuple[Path | None, str | None]:
    """The model folder a config key names, or why there is none (unset or missing)."""
    if given is None:
        return None, f"{key} is not set"
    folder = Path(given).expanduser()
    return (folder, None) if folder.exists() else (None, f"{key} {given} does not exist")


# --- BERTScore ----------------------------------------------------------------------------------

def bertscore_metric(references: list[str], candidates: list[str], eval_cfg) -> dict:
    """Mean BERTScore F1 with the local model folder ``eval_cfg.bertscore_model``."""
    given = eval_cfg.bertscore_model
    folder, missing = _local_folder("eval.bertscore_model", given)
    missing = missing or _missing_package("bert_score")
    if missing:
        return {"unavailable": missing}
    if not (folder / "config.json").is_file():
        return {"unavailable": f"eval.bertscore_model {given} has no config.json (not a model folder)"}
    try:
        config = read_json(folder / "config.json", "the BERTScore model's config")
    except UserError as err:
        return {"unavailable": f"eval.bertscore_model {given}: {err}"}
    layer = eval_cfg.bertscore_layer
    layers = next((config[k] for k in ("num_hidden_layers", "n_layers", "num_layers") if isinstance(config.get(k), int)),
                  None)
    if layers is not None and not 0 <= layer <= layers:
        return {"unavailable": f"eval.bertscore_layer {layer} is outside the {layers} layers of {given}"}
    baseline = None
    if eval_cfg.bertscore_rescale:
        baseline = _baseline_file(folder, config)
        if baseline is None:
            return {"unavailable": f"eval.bertscore_rescale is set but bert-score has no English baseline file for "
                                   f"{given} (looked for rescale_baseline/en/<model name>.tsv)"}

    import torch

    # bert-score 0.3.13 on transformers 5 fails on an empty sentence (it calls the removed
    # build_inputs_with_special_tokens); bert-score gives such a pair a raw F1 of 0, and so do we.
    keep = [i for i, (ref, cand) in enumerate(zip(references, candidates)) if ref.strip() and cand.strip()]
    raw = [0.0] * len(references)
    scorer = None
    try:
        with _model_type(folder, config) as model_type:
            try:
                scorer = _bert_scorer(model_type, layer, baseline)
            except (OSError, ValueError, KeyError, AssertionError) as err:
                return {"unavailable": f"eval.bertscore_model {given} could not be loaded: {err}"}
            if keep:
                f1 = scorer.score([candidates[i] for i in keep], [references[i] for i in keep])[2]
                for i, value in zip(keep, f1.tolist()):
                    raw[i] = value
            if baseline is not None:  # the rescaled pairs already are; rescale the zeros the same way
                base_f = float(scorer.baseline_vals[2])
                kept = set(keep)
                raw = [v if i in kept else (v - base_f) / (1 - base_f) for i, v in enumerate(raw)]
    finally:
        del scorer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = _metric(sum(raw) / len(raw), raw)
    if baseline is not None:
        result["baseline"] = str(baseline.relative_to(baseline.parents[1]))  # e.g. en/roberta-large.tsv
    return result


def _bert_scorer(model_type: str, layer: int, baseline: Path | None):
    """bert-score's scorer on a local folder, with the tokenizer behaving as under transformers 4
    (and special tokens written in a text tokenized as text)."""
    from bert_score import BERTScorer
    from transformers import AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    scorer = BERTScorer(model_type=model_type, num_layers=layer, lang="en", idf=False,
                        rescale_with_baseline=baseline is not None,
                        baseline_path=str(baseline) if baseline is not None else None)
    tokenizer = scorer._tokenizer
    if isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer)) and not getattr(tokenizer, "add_prefix_space", False):
        # bert-score asks for add_prefix_space=True per call (RoBERTa, as in the published
        # scores); transformers 5 ignores that per-call argument, so set it on the tokenizer.
        scorer._tokenizer = AutoTokenizer.from_pretrained(model_type, use_fast=False, add_prefix_space=True)
    scorer._tokenizer.split_special_tokens = True  # "<s>" or "[SEP]" written in an explanation is text
    return scorer


@contextlib.contextmanager
def _model_type(folder: Path, config: dict[str, Any]) -> Iterator[str]:
    """The folder as bert-score's ``model_type``. bert-score picks T5's encoder for any name
    containing "t5"; a folder whose path does but whose model is not a T5 is reached through a
    link from a temporary folder whose path does not."""
    path = str(folder.resolve())
    if "t5" not in path or "t5" in str(config.get("model_type", "")):
        yield path
        return
    for _ in range(100):
        tmp = tempfile.mkdtemp(prefix="xmei_bertscore_")
        if "t5" in tmp:
            Path(tmp).rmdir()
            continue
        try:
            link = Path(tmp) / "model"
            link.symlink_to(path, target_is_directory=True)
            yield str(link)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    raise RuntimeError(f"could not make a temporary path without 't5' for bert-score (TMPDIR {tempfile.gettempdir()})")


def _baseline_file(folder: Path, config: dict[str, Any]) -> Path | None:
    """bert-score's English rescaling baseline for this model: by the folder's name or the
    config's ``_name_or_path`` (e.g. roberta-large). bert-score itself would look for
    ``rescale_baseline/en/<full local path>.tsv`` and, not finding it, silently not rescale."""
    import bert_score

    root = Path(bert_score.__file__).parent / "rescale_baseline" / "en"
    names = [folder.name, folder.resolve().name]
    name_or_path = config.get("_name_or_path")
    if isinstance(name_or_path, str) and name_or_path:
        names += [name_or_path, Path(name_or_path).name]
    for name in names:
        candidate = root / f"{name}.tsv"
        if candidate.is_file():
            return candidate
    return None


# --- BLEURT -------------------------------------------------------------------------------------

def bleurt_metric(references: list[str], candidates: list[str], eval_cfg) -> dict:
    """Mean BLEURT score with the converted checkpoint ``eval_cfg.bleurt_checkpoint``."""
    folder, missing = _local_folder("eval.bleurt_checkpoint", eval_cfg.bleurt_checkpoint)
    if missing:
        return {"unavailable": missing}

    import torch

    from xmei.bleurt import BleurtCheckpointError, BleurtScorer

    try:
        scorer = BleurtScorer.from_pretrained(folder)
    except BleurtCheckpointError as err:
        return {"unavailable": f"eval.bleurt_checkpoint {folder}: {err}"}
    try:
        scores = scorer.score(references, candidates)
    finally:
        del scorer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _metric(sum(scores) / len(scores), scores)


def _check_inputs(references: Sequence[str], candidates: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(references, str) or isinstance(candidates, str):
        raise TypeError("references and candidates must be lists of strings, not strings")
    references, candidates = list(references), list(candidates)
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if not references:
        raise ValueError("no explanations to score (empty lists)")
    for name, texts in (("references", references), ("candidates", candidates)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] is {type(text).__name__}, not str")
    return references, candidates
