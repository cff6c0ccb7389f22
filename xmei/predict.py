"""Bulk prediction (`xmei predict --annotations FILE | --store S --out DIR`): every ok clip of a
store to predictions, with the model loaded once, batched, resumable.

    DIR/
      store/                      the cached store (with --annotations: `xmei extract`'s own code)
      predict.json                what made the run: checkpoint, store, annotations, media root,
                                  generation config; counts once it is done
      predictions.partial.jsonl   while running: the rows of every finished batch
      predictions.jsonl           one row a clip, store order (ROW_FIELDS)
      predictions.csv             CSV_FIELDS, UTF-8
      failures.jsonl              the clips that failed extraction: video_id, stage, reason

Process model: one process, or several under ``torchrun`` (xmei.distributed). The clips still
to do are cut into batches of run.batch_size_eval, as one process would cut them, and dealt as
`xmei eval` deals them: batch j to rank j % world. The ranks go in rounds of one batch each;
after every round rank 0 gathers the round's rows and appends them to the partial file, flushed
and fsynced, so a kill loses at most the round in flight. A stop request (SIGTERM / SIGINT,
xmei.interrupt) on any rank ends every rank at the next round boundary (Interrupted).

Resume: a rerun reads the rows of predictions.jsonl and of the partial file (a torn last line,
what a kill during an append leaves, is cut off; any other bad line is an error naming it), and
generates only for the clips without a whole row. The final files are written whole
(xmei.errors.write_whole) from those rows, then the partial file is removed. A rerun with another
checkpoint, store or generation config than predict.json records is refused (``overwrite``
starts over).
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import BatchSampler

from pipeline.annotations import extra_values
from stores import FeatureStore
from xmei.data import StoreSamples
from xmei.distributed import Distributed
from xmei.errors import UserError, json_lines, read_json, write_whole
from xmei.generate import GenerationSettings, label_constraint
from xmei.interrupt import Interrupted, StopRequest
from xmei.model import XMEIQwen
from xmei.predictor import GIVEN, answer_rows

__all__ = ["CSV_FIELDS", "PARTIAL", "ROW_FIELDS", "PredictRunError", "predict_store", "start_run",
           "read_rows", "subtitle_sources", "write_outputs"]

PARTIAL = "predictions.partial.jsonl"
ROW_FIELDS = ("video_id", "emotion", "intent", "emotion_probs", "intent_probs", "explanation", "text", "cut_off",
              "subtitle", "subtitle_source")
CSV_FIELDS = ("video_id", "emotion", "intent", "emotion_p", "intent_p", "explanation", "subtitle_source")
# predict.json's facts a resume must share: the store by what it holds (a moved OUT resumes)
SAME_RUN = ("checkpoint", "store_fingerprint", "generation")
OUTPUTS = ("predictions.jsonl", "predictions.csv", "failures.jsonl", "predict.json", PARTIAL)


class PredictRunError(UserError, ValueError):
    """An output folder that this run cannot resume, or a damaged file in it (named)."""


def start_run(out: Path, facts: dict[str, Any], overwrite: bool = False) -> None:
    """Make ``out`` the folder of the run of ``facts`` (checkpoint, store_fingerprint, generation, ...): a
    folder of another run is refused naming what differs, unless ``overwrite``, which removes its
    outputs (never the cached store). Records ``facts`` in predict.json."""
    out.mkdir(parents=True, exist_ok=True)
    facts = json.loads(json.dumps(facts))  # as predict.json gives them back
    record = out / "predict.json"
    if record.exists() and not overwrite:
        made = read_json(record, "the record of an earlier prediction run", PredictRunError, dict)
        differs = [f"{k} {made.get(k)!r}, this run {facts.get(k)!r}" for k in SAME_RUN if made.get(k) != facts.get(k)]
        if differs:
            raise PredictRunError(f"{out} holds the predictions of another run ({'; '.join(differs)}): choose another "
                                  "--out, or give --overwrite to start over there")
    elif overwrite:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    write_whole(record, json.dumps({**facts, "done": False}, indent=1) + "\n", "the record of this run")


def subtitle_sources(annotations: Path | None) -> dict[str, str]:
    """video_id -> the extra field ``subtitle_source`` of the records of ``annotations`` that
    have one (`xmei annotate` writes it); {} when the file is gone."""
    if annotations is None or not Path(annotations).is_file():
        return {}
    return extra_values(annotations, "subtitle_source")


def read_rows(out: Path) -> dict[str, dict]:
    """The whole rows of an earlier run into ``out`` (predictions.jsonl, then the partial file),
    by video_id. A torn last line of the partial file is cut off the file."""
    rows = {}
    final = out / "predictions.jsonl"
    if final.exists():
        rows.update((row["video_id"], row) for _, row in _rows(final))
    partial = out / PARTIAL
    if partial.exists():
        data = partial.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]  # a kill during an append leaves a line without its end
        if len(whole) < len(data):
            with open(partial, "r+b") as f:
                f.truncate(len(whole))
        rows.update((row["video_id"], row) for _, row in _rows(partial))
    return rows


def _rows(path: Path):
    for number, row in json_lines(path, "the predictions of an earlier run", PredictRunError,
                                  "delete it (or give --overwrite) to predict those clips again"):
        if not isinstance(row, dict) or set(ROW_FIELDS) - set(row):
            raise PredictRunError(f"{path}: line {number} is not a whole prediction row (expected {list(ROW_FIELDS)}); "
                                  "delete the file (or give --overwrite) to predict those clips again")
        yield number, row


class _Journal:
    """The partial file, appended a round at a time, each append flushed and fsynced."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def append(self, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def predict_store(model: XMEIQwen, store: Path, out: Path, cfg, settings: GenerationSettings,
                  sources: dict[str, str], dist: Distributed | None = None,
                  progress: Callable[[int, int], None] | None = None, stop: StopRequest | None = None) -> list[dict] | None:
    """Rank 0: the row of every ok clip of ``store`` in store order, generating those that ``out``
    holds no whole row of (module docstring); the other ranks: None. ``sources``: video_id ->
    subtitle_source (else "given"). ``progress(done, total)`` on rank 0 counts every rank's clips."""
    dist = dist or Distributed(0, 1, 0, next(model.parameters()).device)
    model.eval()
    constraint = label_constraint(model, settings)
    builder = model.prompt_builder()
    data = StoreSamples([store], modalities=model.settings.modalities)
    ids = list(data.strings["video_id"])
    done = read_rows(out) if dist.main else {}  # video_id -> row
    have = set(dist.broadcast(sorted(done)) if dist.world > 1 else done)
    todo = [p for p in range(len(data)) if ids[p] not in have]
    batches = list(BatchSampler(todo, settings.batch_size, drop_last=False))  # as one process has them
    journal = _Journal(out / PARTIAL) if dist.main else None
    finished = 0
    try:
        if progress:
            progress(finished, len(todo))
        for first in range(0, len(batches), dist.world):
            j = first + dist.rank  # this rank's batch of the round, as `xmei eval` deals them
            samples = data.__getitems__(batches[j]) if j < len(batches) else []
            answers = answer_rows(model, samples, settings, constraint, cfg, builder) if samples else []
            rows = [_row(s["texts"], a, sources) for s, a in zip(samples, answers)]
            gathered = dist.gather(rows)
            if dist.main:
                journal.append([row for part in gathered for row in part])
                done.update((row["video_id"], row) for part in gathered for row in part)
            finished += sum(len(batches[k]) for k in range(first, min(first + dist.world, len(batches))))
            if progress and dist.main:
                progress(finished, len(todo))
            if finished < len(todo):
                _check_stop(stop, dist, finished, len(todo), out)
    finally:
        if journal:
            journal.close()
    return [done[i] for i in ids] if dist.main else None


def _row(texts: dict, answer: dict, sources: dict[str, str]) -> dict:
    """A row of ROW_FIELDS: the store's texts, the answer's fields (probabilities null where
    xmei.generate gives none)."""
    return {"video_id": texts["video_id"], "emotion": answer["emotion"], "intent": answer["intent"],
            "emotion_probs": answer.get("emotion_probs"), "intent_probs": answer.get("intent_probs"),
            "explanation": answer["explanation"], "text": answer["text"], "cut_off": answer["cut_off"],
            "subtitle": texts["subtitle"], "subtitle_source": sources.get(texts["video_id"], GIVEN)}


def _check_stop(stop: StopRequest | None, dist: Distributed, finished: int, total: int, out: Path) -> None:
    """At a round boundary: Interrupted on every rank once a signal reached any of them."""
    requested = stop is not None and stop.requested
    if dist.world > 1:
        requested = bool(dist.all_sum(torch.tensor([float(requested)])).item())
    if not requested:
        return
    signum = stop.signum if stop is not None and stop.requested else signal.SIGTERM
    raise Interrupted(signum, f"{signal.Signals(signum).name}: stopped at a batch boundary after {finished} of "
                              f"{total} clips; their predictions are kept in {out / PARTIAL}: run the same command "
                              "again to predict the rest")


def write_outputs(out: Path, rows: list[dict], store: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """predictions.jsonl, predictions.csv, failures.jsonl and predict.json (``facts`` and the
    counts), each whole; then the partial file goes. Returns what predict.json holds."""
    failures = FeatureStore(store).failures()
    write_whole(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                "the predictions")
    write_whole(out / "predictions.csv", _csv(rows), "the predictions as CSV")
    write_whole(out / "failures.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in failures),
                "the clips that failed extraction")
    record = {**facts, "done": True, "predicted": len(rows), "failed": len(failures),
              "cut_off": sum(bool(r["cut_off"]) for r in rows),
              "unparsed": sum(r["emotion"] is None or r["intent"] is None for r in rows)}
    write_whole(out / "predict.json", json.dumps(record, indent=1) + "\n", "the record of this run")
    (out / PARTIAL).unlink(missing_ok=True)
    return record


def _csv(rows: list[dict]) -> str:
    """CSV_FIELDS of each row; emotion_p / intent_p: the probability of the predicted label, empty
    when unavailable."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_FIELDS)
    for r in rows:
        p = {kind: (r.get(f"{kind}_probs") or {}).get(r[kind]) if r[kind] else None for kind in ("emotion", "intent")}
        writer.writerow([r["video_id"], r["emotion"] or "", r["intent"] or "", _number(p["emotion"]),
                         _number(p["intent"]), r["explanation"] or "", r["subtitle_source"]])
    return text.getvalue()


def _number(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"
