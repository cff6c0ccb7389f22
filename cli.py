"""The `xmei` command. Thin: it parses options and calls the packages.

Every command that reads a config takes ``--config FILE`` (defaults: the published values and
MC-EIU label sets), repeatable ``--set section.key=value`` and ``--models DIR`` (a folder laid out
as ``xmei models tiny`` writes it, which overrides the checkpoint paths): declared once below as
``ConfigOpt``, ``SetOpt`` and ``ModelsOpt`` and read by ``_load``. The ``stores`` commands read no
config and take none of them.

A mistake the user can fix ends the command with "error: <message>" on stderr: a library's
``UserError`` with status 1 at ``main``'s boundary, a bad config or option with status 2 (``_fail``).
Cheap checks first: a command that reads a checkpoint checks every file of it (``_load_checkpoint``)
and the stores it reads (xmei.settings.open_stores) before it imports torch, transformers or peft,
so a damaged input is named in seconds, not after a model has loaded.

`train`, `extract` and `eval` hold the lock of the folder they write (``_one_run``, xmei.runlock)
until they end: a second run into it stops at once, naming the first. `extract` and `eval` stop
at a shard / batch boundary on SIGTERM or SIGINT (xmei.interrupt) and end with status 128 + the
signal's number, saying what is kept.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
import yaml
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from xmei.config import Config, ConfigError, load_config
from stores.location import Location, use_endpoint
from xmei.errors import DEBUG_VARIABLE, UserError, debugging, message_of
from xmei.interrupt import Interrupted

if TYPE_CHECKING:
    from stores import FeatureStore
    from xmei.settings import XMEISettings

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="xmei: joint multimodal emotion-intent classification and explanation (JX4MEI).")
models_app = typer.Typer(no_args_is_help=True, help="Model folders for tests, demos and smoke runs.")
app.add_typer(models_app, name="models")
stores_app = typer.Typer(no_args_is_help=True, help=(
    "Inspect, check and move feature stores: folders, or s3:// gs:// az:// URLs (credentials and an S3-compatible "
    "server's endpoint from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL ...)."))
app.add_typer(stores_app, name="stores")
console = Console(soft_wrap=True)  # long lines stay whole: logs and greps read them
err = Console(stderr=True, soft_wrap=True)

# the options of every command that reads a config, each command passing them to _load
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one key, e.g. --set run.init_lr=1e-4 (repeatable).")]
ModelsOpt = Annotated[Optional[Path], typer.Option(
    "--models", help="Folder laid out as `xmei models tiny` writes it; overrides the checkpoint paths.")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of an error the user can fix, too (or set XMEI_DEBUG=1).")] = False,
        local_rank: Annotated[Optional[int], typer.Option(
            "--local_rank", "--local-rank", hidden=True,
            help="Set by the deepspeed launcher (`deepspeed --num_gpus N $(which xmei) train ...`).")] = None):
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"  # also reaches the processes a command starts
    if local_rank is not None:  # the launcher's LOCAL_RANK (it sets both) wins
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


def _load(config: Path | None, sets: list[str] | None, models: Path | None, *,
          require: tuple[str, ...] = ()) -> Config:
    """The command's config: --config, else the defaults; then --set and --models. Warnings go to
    stderr; a config error, or a path of ``require`` that does not exist, ends the command with status 2."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = load_config(config, sets or [], models_dir=models)
        except ConfigError as e:
            _fail(e)
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    if require:
        try:
            cfg.require_paths(require)
        except ConfigError as e:
            _fail(e)
    use_endpoint(cfg.stores.endpoint_url)  # into the environment: this process's stores and those it starts
    return cfg


def _load_checkpoint(checkpoint: Path, config: Path | None, sets: list[str] | None,
                     models: Path | None) -> tuple[Config, XMEISettings]:
    """The command's config as ``_load`` reads it, but defaulting to the config saved with the
    checkpoint, and the checkpoint's settings. Every file of the checkpoint is checked first, before
    torch is imported: a damaged one is an error naming it (status 1)."""
    from xmei.checkpoint import verify_checkpoint

    settings = verify_checkpoint(checkpoint, config=config is None)
    if config is None and (checkpoint / "config.yaml").is_file():
        config = checkpoint / "config.yaml"
    return _load(config, sets, models), settings


def _open_fitting(store: Path, checkpoints: dict[Path, XMEISettings]) -> FeatureStore:
    """The store, opened and checked (xmei.settings.open_stores) for the modalities of every
    checkpoint (folder: its settings), whose features are those each checkpoint was trained on:
    a damaged store, or one of other features, is an error naming it and the difference (status
    1), before torch is imported."""
    from xmei.settings import check_fit, feature_facts, open_stores

    opened, = open_stores([store], {m for settings in checkpoints.values() for m in settings.modalities})
    for folder, settings in checkpoints.items():
        check_fit(feature_facts(opened), settings, folder, str(store))
    return opened


def _config_source(config: Path | None, sets: list[str] | None, models: Path | None) -> str:
    """Where a checkpoint command's config came from, as its errors name it."""
    changed = " and ".join(flag for flag, given in (("--set", sets), ("--models", models)) if given)
    return (f"--config {config}" if config else "the checkpoint's config") + (f" with {changed}" if changed else "")


def _check_clip_features(cfg: Config, checkpoint: Path, source: str) -> None:
    """xmei.predictor.check_clip_features, a missing model folder ending the command with status 2."""
    from xmei.predictor import check_clip_features

    try:
        check_clip_features(cfg, checkpoint, source)
    except ConfigError as e:
        _fail(e)


def _fail(message: str | BaseException, code: int = 2) -> None:
    """End the command: "error: <message>" on stderr, exit status ``code`` (the traceback too with
    --debug when ``message`` is an exception)."""
    if debugging() and isinstance(message, BaseException):
        raise message
    _say_error(message)
    raise typer.Exit(code)


def _fail_with_problems(what: str, problems: list) -> None:
    """End the command with status 1: "error: <what>: N problem(s):", then one problem a line."""
    _say_error(f"{what}: {len(problems)} problem(s):")
    for p in problems:
        err.print(f"  {escape(str(p))}", highlight=False, soft_wrap=True)  # a value may hold "[...]"
    raise typer.Exit(1)


def _say_error(message: str | BaseException) -> None:
    text = message_of(message) if isinstance(message, BaseException) else message
    err.print(f"[red]error:[/] {escape(text)}", highlight=False)  # "[video]" in a message is text


def _one_run(ctx: typer.Context, lock: Path, folder: Path, option: str, dist=None) -> None:
    """Hold the lock of the folder the command of ``ctx`` writes (xmei.runlock) until the command
    ends, however it ends: a second run into it stops here, naming the first, before any model or
    data loads. With ``dist`` of several ranks rank 0 takes it and every rank learns the outcome;
    a refusal also leaves the process group."""
    from xmei.runlock import RunLockError, run_lock

    several = dist is not None and dist.world > 1
    try:
        ctx.with_resource(run_lock(
            lock, folder, option, rank=dist.rank if several else 0, share=dist.broadcast if several else None,
            say=lambda note: err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)))
    except RunLockError:
        if dist is not None:
            dist.close()
        raise


@app.command("config")
def config_cmd(config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
               check: Annotated[bool, typer.Option(help="Also check that every configured path exists.")] = False):
    """Print the resolved config as YAML (after --set and --models)."""
    cfg = _load(config, sets, models)
    console.print(yaml.safe_dump(cfg.to_dict(machine=True), sort_keys=False), end="", highlight=False)
    if check:
        keys = _configured_paths(cfg)
        try:
            cfg.require_paths(keys)
        except ConfigError as e:
            _fail(f"missing paths:\n{e}", 1)
        err.print(f"all {len(keys)} configured paths exist")


def _configured_paths(cfg: Config) -> list[str]:
    """The keys of every path a config names: the four models (and the ASR model when set) and each
    dataset's media and annotations."""
    keys = [f"model.{k}" for k in ("visual_encoder_path", "acoustic_encoder_path", "llama_model_path",
                                   "caption_tokenizer_path")]
    keys += ["model.asr_path"] if cfg.model.asr_path is not None else []
    for name, ds in cfg.datasets.items():
        keys.append(f"datasets.{name}.media_root")
        keys += [f"datasets.{name}.annotations.{split}" for split in ds.annotations]
    return keys


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the corpus into.")],
    n: Annotated[int, typer.Option("--n", help="Number of clips (split 70/15/15 into train/val/test).")] = 200,
    seed: Annotated[int, typer.Option(help="Everything is a function of the seed.")] = 0,
    workers: Annotated[Optional[int], typer.Option(help="Rendering processes (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a folder that already holds a corpus.")] = False,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Write a synthetic corpus of real mp4/wav files in the published dataset layout.

    Emotion is carried by what is seen (a drawn face's color, mouth, brows, motion), intent by
    what is heard (pitch register, contour and rhythm of voiced tones); the texts mention the
    cues only partly and noisily.
    """
    from pipeline.synth import synth_corpus

    cfg = _load(config, sets, models)
    with _progress() as bar:
        task = bar.add_task("rendering clips", total=n)
        try:
            counts = synth_corpus(out_dir, n, seed, cfg.emotions, cfg.intents, workers=workers,
                                  overwrite=overwrite, progress=lambda k: bar.advance(task, k))
        except (ValueError, FileExistsError) as e:
            _fail(e)
    split_text = ", ".join(f"{k} {v}" for k, v in counts.items())
    console.print(f"wrote {n} clips to {out_dir} ({split_text}); annotations in {out_dir / 'annotations'}")


@app.command()
def validate(
    annotations: Annotated[Path, typer.Argument(help="Annotation file: JSON list or JSONL.")],
    media_root: Annotated[Optional[Path], typer.Option(
        help="Folder the media paths are relative to. Default: the config's dataset media_root, "
             "else the folder above annotations/ (published layout).")] = None,
    unlabeled: Annotated[bool, typer.Option(help="Allow empty emotion/intent (a prediction-only split).")] = False,
    allow_absolute_paths: Annotated[bool, typer.Option(
        help="Accept absolute media paths (else refused, as is any path leaving the media root; "
             "or set extract.allow_absolute_paths).")] = False,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Check an annotation file against the contract; list every problem and exit 1 if any."""
    from pipeline.annotations import check_annotations

    cfg = _load(config, sets, models)
    media_root = _media_root(cfg, media_root, annotations)
    records, problems, summary = check_annotations(
        annotations, cfg.emotions, cfg.intents, media_root, labeled=not unlabeled,
        allow_absolute=allow_absolute_paths or cfg.extract.allow_absolute_paths)
    _print_annotations(annotations, summary, len(records), media_root)
    if problems:
        _fail_with_problems(str(annotations), problems)
    console.print("[green]ok[/]")


@app.command()
def annotate(
    videos_dir: Annotated[Path, typer.Argument(metavar="VIDEOS_DIR", help="Folder of videos (searched recursively).")],
    out: Annotated[Path, typer.Option(help="The annotation file to write (a JSON list); VIDEOS_DIR is its media root.")],
    subtitles: Annotated[Optional[list[Path]], typer.Option(
        help="A CSV of subtitles, one row a clip (repeatable); its name column holds the video_id or the "
             "file's stem.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="The CSV layout of a dataset: mer (MER2023-2025 transcription.csv / subtitle_chieng.csv: "
             "name, chinese, english; text: english) or meld (MELD {train,dev,test}_sent_emo.csv: "
             "Utterance of clip dia{Dialogue_ID}_utt{Utterance_ID}).")] = None,
    name_column: Annotated[Optional[str], typer.Option(
        help="The CSV column naming the clip (default: the preset's, else 'name').")] = None,
    text_column: Annotated[Optional[str], typer.Option(
        help="The CSV column of the text (default: the preset's, else 'text'; e.g. chinese for mer).")] = None,
    asr: Annotated[Optional[bool], typer.Option(
        "--asr/--no-asr", help="Transcribe clips without a subtitle with the Whisper of model.asr_path "
                               "(default: on when it is set).")] = None,
    asr_batch_size: Annotated[int, typer.Option(min=1, help="30 s windows per Whisper batch.")] = 8,
    asr_max_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="Most tokens Whisper writes per 30 s window (default 224, as OpenAI's decoding).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Unlabeled annotations of a folder of raw videos, each with a subtitle: from a sidecar .srt /
    .vtt / .txt beside the video, else a --subtitles CSV, else speech recognition (Whisper), else
    none (counted). Files that are no readable video are listed and left out."""
    from pipeline.annotate import PRESETS, VIDEO_SUFFIXES, SubtitleTable, Transcriber
    from pipeline.annotate import annotate as run_annotate

    cfg = _load(config, sets, models)
    if not videos_dir.is_dir():
        _fail(f"{videos_dir} is not a folder")
    if out.is_dir() or (out.exists() and not overwrite):
        _fail(f"{out} is a folder" if out.is_dir() else f"{out} exists; pass --overwrite to replace it")
    if (preset or name_column or text_column) and not subtitles:
        _fail("--preset, --name-column and --text-column describe a --subtitles CSV; none was given")
    if preset is not None and preset not in PRESETS:
        _fail(f"--preset {preset}: not one of {', '.join(PRESETS)}")
    table = SubtitleTable.read(subtitles, PRESETS.get(preset), name_column, text_column) if subtitles else None
    transcriber = None
    if asr or (asr is None and cfg.model.asr_path is not None):
        if asr is None:
            err.print(f"speech recognition with {cfg.model.asr_path} (model.asr_path; --no-asr turns it off)")
        try:
            cfg.require_paths(["model.asr_path"])
        except ConfigError as e:
            _fail(e)
        transcriber = Transcriber(cfg.model.asr_path, cfg.run.device, asr_batch_size, asr_max_tokens)
    with _progress() as bar:
        tasks = {}

        def advanced(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = run_annotate(videos_dir, table, transcriber, advanced)
    _print_annotated(result, out, videos_dir)
    if not result.records:
        _fail(f"no readable video under {videos_dir} (looked for {', '.join(VIDEO_SUFFIXES)} in any case): "
              f"{out} not written", 1)


def _print_annotated(result, out: Path, videos_dir: Path) -> None:
    """Write what `xmei annotate` made (when it made a record); then counts by subtitle source, notes,
    files left out."""
    from pipeline.annotate import write_annotated

    skipped_file = write_annotated(result, out) if result.records else None
    if result.records:
        sources = ", ".join(f"{source} {count}" for source, count in result.sources().items())
        console.print(f"{escape(str(out))}: {len(result.records)} clips (subtitles: {sources}); "
                      f"media root {escape(str(videos_dir))}", highlight=False)
    if result.asr_seconds:
        console.print(f"speech recognition: {len(result.asr_seconds)} clips, "
                      f"{sum(result.asr_seconds) / len(result.asr_seconds):.2f} s per clip")
    for note in result.notes:
        err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    if result.skipped:
        listed = f" (listed in {escape(str(skipped_file))})" if skipped_file else ""
        err.print(f"{len(result.skipped)} file(s) left out{listed}:", highlight=False)
        for s in result.skipped:
            err.print(f"  {escape(s.path)} ({s.stage}): {escape(s.reason)}", highlight=False)


def _print_annotations(annotations: Path, summary, valid: int, media_root: Path | None) -> None:
    """The summary of `xmei validate`: counts, both label distributions, audio sources, extra fields, missing media."""
    console.print(f"[bold]{escape(str(annotations))}[/]: {summary.count} records, {valid} valid; "
                  f"media root {media_root or '(none: media not checked)'}")
    tables = []
    for title, dist in (("emotion", summary.emotions), ("intent", summary.intents)):
        table = Table(title, "clips", show_edge=False)
        for label, count in dist.items():
            table.add_row(label, str(count))
        tables.append(table)
    console.print(Columns(tables, padding=(0, 6)))
    console.print(f"audio: {summary.audio_from_file} from audio files, "
                  f"{summary.audio_from_video_track} from the video's own track (empty audio_path)")
    if summary.extra_fields:  # names as the file has them; a lone surrogate (a JSON "\\ud800") shows as its escape
        shown = ", ".join(summary.extra_fields).encode("utf-8", "backslashreplace").decode()
        console.print(f"fields beyond the published 11, ignored: {escape(shown)}", highlight=False)
    if summary.missing_media:
        console.print(f"[red]{len(summary.missing_media)} clip(s) with missing media:[/] "
                      + escape(", ".join(summary.missing_media)), highlight=False)


def _media_root(cfg: Config, given: Path | None, annotations: Path) -> Path | None:
    """--media-root, else the media root of the config's only dataset, else the folder above
    annotations/ (published layout); None when none of them applies."""
    from pipeline.annotations import default_media_root

    roots = {name: ds.media_root for name, ds in cfg.datasets.items() if ds.media_root is not None}
    if given is None and len(roots) == 1:
        (name, given), = roots.items()
        try:
            cfg.require_paths([f"datasets.{name}.media_root"])
        except ConfigError as e:
            _fail(e)
    root = given or default_media_root(annotations)
    if root is not None and not root.is_dir():
        _fail(f"media root {root} is not a folder")
    return root


def _store_media_root(cfg: Config, given: Path | None, store: Path) -> Path | None:
    """The media root of a store's clips, resolved as `xmei attention` does."""
    from stores import FeatureStore

    return _media_root(cfg, given, Path(FeatureStore(store).attrs.get("annotations", ".")))


@app.command()
def extract(
    ctx: typer.Context,
    annotations: Annotated[Path, typer.Option(help="Annotation file of one split (JSON list or JSONL).")],
    out: Annotated[str, typer.Option(help="The feature store to write (a folder or an s3:// gs:// az:// URL); rerun "
                                          "to resume it.")],
    media_root: Annotated[Optional[Path], typer.Option(
        help="Folder the media paths are relative to (default as in `xmei validate`).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split name kept in the store (default: file stem).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Address of a running dask scheduler (a GPU farm); default: a LocalCluster here.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="LocalCluster workers, each pinned to its own GPU (default: one per GPU, times "
             "extract.workers_per_gpu; 1 without a GPU); 0 runs in this process without dask.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first clip that fails, instead of recording it.")] = False,
    unlabeled: Annotated[bool, typer.Option(help="Allow empty emotion/intent (a prediction-only split).")] = False,
    allow_absolute_paths: Annotated[bool, typer.Option(
        help="Accept absolute media paths (as extract.allow_absolute_paths: true does).")] = False,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Stage 1: frozen CLIP / HuBERT features and tokenized captions into a sharded Zarr store.

    Each dask task extracts and writes whole shards; a rerun skips finished shards. A clip whose
    media are missing or corrupt is marked failed (reason in STORE/failures.jsonl) and the run goes on.
    Each worker decodes in extract.decode_workers processes (default: its share of the cores).
    SIGTERM or Ctrl-C stops it at a shard boundary, keeping every finished shard: rerun to resume.
    """
    cfg = _load(config, sets, models)
    cfg.extract.allow_absolute_paths |= allow_absolute_paths
    root = _media_root(cfg, media_root, annotations)
    if root is None:
        _fail("no media root: give --media-root (or a config dataset media_root)")
    _extract_store(ctx, cfg, annotations, root, out, split=split, scheduler=scheduler, workers=workers, strict=strict,
                   unlabeled=unlabeled)


def _extract_store(ctx: typer.Context, cfg: Config, annotations: Path, root: Path, out: str | Path,
                   **options) -> None:
    """Stage 1 of `xmei extract` (and of `xmei predict --annotations`) into the store ``out``,
    holding its lock: a progress bar, then the summary and each failed clip. ``options``: those
    of pipeline.extract.extract (split, scheduler, workers, strict, unlabeled)."""
    from xmei.interrupt import stop_on_signals
    from xmei.runlock import store_lock

    _one_run(ctx, store_lock(out), out, "--out")  # before torch is imported: a second run ends at once
    from pipeline.extract import ExtractWarning
    from pipeline.extract import extract as run_extract

    shard_size = cfg.extract.shard_size
    with _progress(TextColumn("{task.fields[failed]} failed")) as bar:
        task = bar.add_task("extracting", total=None, failed=0)

        def started(summary) -> None:
            bar.update(task, total=summary.clips, completed=min(summary.shards_skipped * shard_size, summary.clips))
            if summary.shards_skipped:
                bar.console.print(f"resuming: {summary.shards_skipped} of {summary.shards} shards already done")
            if summary.dashboard:
                bar.console.print(f"dask dashboard: {summary.dashboard}")
            if summary.space:
                bar.console.print(f"[yellow]warning:[/] {escape(summary.space)}", highlight=False)

        def advanced(clips: int, failed: int) -> None:
            bar.update(task, advance=clips, failed=bar.tasks[task].fields["failed"] + failed)

        with warnings.catch_warnings(record=True) as caught, stop_on_signals(cfg.run.preempt_grace_s) as stop:
            warnings.simplefilter("always", ExtractWarning)
            summary = run_extract(cfg, annotations, root, out, progress=advanced, on_start=started, stop=stop,
                                  **options)
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    rate = (summary.clips - summary.shards_skipped * shard_size) / max(summary.seconds, 1e-9)
    console.print(f"{out}: {summary.ok} ok, {len(summary.failed)} failed of {summary.clips} clips "
                  f"in {summary.shards} shards ({summary.seconds:.1f} s, {max(rate, 0):.1f} clips/s)")
    for row in summary.failed:
        err.print(f"  failed {row['video_id']} ({row['stage']}): {row['reason']}", highlight=False, soft_wrap=True)
    if summary.failed:
        from stores.files import store_files

        err.print(f"failures log: {store_files(out).name('failures.jsonl')}")


@app.command()
def train(
    ctx: typer.Context,
    store: Annotated[list[str], typer.Option(help="Feature store(s) to train on (a folder or an s3:// gs:// az:// "
                                                  "URL; repeatable).")],
    output_dir: Annotated[Path, typer.Option(help="Checkpoints, logs/train.jsonl and TensorBoard events go here.")],
    val_store: Annotated[Optional[str], typer.Option(help="Store for the validation loss at each epoch end "
                                                          "(a folder or an s3:// gs:// az:// URL).")] = None,
    engine: Annotated[str, typer.Option(help="torch: one process (CPU or one GPU); deepspeed: ZeRO-2 under the "
                                             "deepspeed or torchrun launcher.")] = "torch",
    resume: Annotated[bool, typer.Option(help="Continue exactly from the last checkpoint in --output-dir.")] = False,
    rebatch: Annotated[bool, typer.Option(
        help="With --resume: accept another number of processes, batch size or accumulation than the checkpoint's; "
             "training goes on from the same sample and the schedule is recomputed from the samples seen. "
             "Without it such a resume is refused, naming what changed.")] = False,
    strict: Annotated[bool, typer.Option(
        help="Stop at a sample that cannot be made, naming its clip, instead of skipping and counting it.")] = False,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Stage 2: train the LQ-Formers and the LoRA adapter on cached features.

    Several processes (torchrun / deepspeed launchers) train one model: --engine torch wraps it in
    DistributedDataParallel, --engine deepspeed in ZeRO-2. Each optimizer step averages the loss over
    every target token of all its micro-batches on all ranks.
    """
    from xmei.distributed import Distributed, launcher_env
    from xmei.runlock import LOCK_NAME
    from xmei.train import Trainer, TrainWarning

    cfg = _load(config, sets, models, require=("model.llama_model_path", "model.caption_tokenizer_path"))
    launcher_env()  # a SLURM task without a launcher learns its rank here
    _one_run(ctx, output_dir / LOCK_NAME, output_dir, "--output-dir", Distributed.start(cfg.run.device))
    rank0 = int(os.environ.get("RANK", 0)) == 0
    fields = TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[clips]:.1f} clips/s  "
                        "data wait {task.fields[wait]:.0%}")
    with _progress(fields, unit="steps", disable=not rank0) as bar:
        trainer = Trainer(cfg, store, val_store, output_dir, engine=engine, resume=resume, rebatch=rebatch,
                          progress=_training_progress(bar), strict=strict)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", TrainWarning)
                trainer.setup()
            for w in caught:
                bar.console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
            last = trainer.train()
            if trainer.stopped:  # said before cleanup(), where every rank waits for it
                _print_stopped(trainer.stopped, rank0)
        finally:
            trainer.cleanup()
    if trainer.stopped:
        raise typer.Exit(trainer.stopped.status)
    if rank0:
        _print_training(trainer, last, output_dir)


def _training_progress(bar: Progress):
    """The trainer's progress callback: the bar's loss, rate and data wait; each epoch's validation
    loss; the first 10 skipped clips, each named with its reason (every one is in train.jsonl)."""
    task = bar.add_task("training", total=None, loss=float("nan"), lr=0.0, clips=0.0, wait=0.0)
    said = 0  # skipped clips named so far

    def advanced(step: int, total: int, record: dict) -> None:
        nonlocal said
        for c in record.get("skipped_clips", []) + record.get("val_skipped_clips", []):
            if said < 10:
                bar.console.print(f"[yellow]warning:[/] skipped clip {escape(c['clip'])}: {escape(c['reason'])}",
                                  highlight=False)
            said += 1
        if "loss" in record:
            bar.update(task, completed=step, total=total, loss=record["loss"], lr=record["lr"],
                       clips=record["clips_per_s"], wait=record["data_wait"])
        elif record.get("val_loss") is not None:
            bar.console.print(f"epoch {record['epoch']}: val loss {record['val_loss']:.4f}")

    return advanced


def _print_stopped(stopped, rank0: bool) -> None:
    """A run that SIGTERM or SIGINT stopped (xmei.train): rank 0 gives the command that resumes it,
    each other rank a line. `xmei train` then exits with 128 + the signal's number (143, 130)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
    resume = shlex.join(["xmei", *args, *([] if "--resume" in args else ["--resume"])])
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        resume += " (under the same launcher, with as many processes)"
    rank = "" if rank0 else f"rank {os.environ.get('RANK')}: "
    err.print(f"{rank}{escape(stopped.message(resume if rank0 else None))}", highlight=False, soft_wrap=True)


def _print_training(trainer, last: dict, output_dir: Path) -> None:
    """The run's end: steps, last loss and where its files are; samples cut or skipped, and which clips."""
    loss = f", last loss {last['loss']:.4f}" if "loss" in last else ""  # none when resumed at the end of an epoch
    console.print(f"done: {trainer.position.step} steps{loss}; "
                  f"checkpoints in {output_dir / 'checkpoints'}, log {output_dir / 'logs' / 'train.jsonl'}")
    f = trainer.faults
    console.print(f"samples cut to model.max_length: {f['truncated']} in training, {f['val_truncated']} in "
                  f"validation; skipped (could not be made): {f['skipped']} in training, {f['val_skipped']} in "
                  "validation", highlight=False)
    if trainer.skipped_clips:
        clips = sorted({c["clip"] for c in trainer.skipped_clips})
        console.print(f"skipped clips: {escape(', '.join(clips[:10]))}{' ...' if len(clips) > 10 else ''} "
                      "(each with its reason in train.jsonl)", highlight=False)


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint folder (DIR/checkpoints/step_N of `xmei train`).")],
    store: Annotated[str, typer.Option(help="The feature store of the held-out split (a folder or an s3:// gs:// "
                                            "az:// URL).")],
    out: Annotated[Path, typer.Option(help="Folder for predictions.jsonl, results.json, report.md, PNGs.")],
    constrained: Annotated[Optional[bool], typer.Option(
        "--constrained/--free", help="Emotion and intent only from the labels, or decoded freely "
                                     "[default: eval.constrained]", show_default=False)] = None,
    compare_free: Annotated[bool, typer.Option(help="Also decode freely (twice the generation time), "
                                                    "for results.json's free_decoding.")] = False,
    html: Annotated[bool, typer.Option("--html", help="Also write OUT/report.html, the browsable page of every "
                                                      "clip (as `xmei report OUT --store STORE` does).")] = False,
    media_root: Annotated[Optional[Path], typer.Option(help="With --html: where the clips' videos are, for the "
                                                            "frames (default as in `xmei attention`).")] = None,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Generate for every ok clip of a store, then score: classification and the six explanation metrics.

    Greedy decoding by default (eval.num_beams > 1: beam search), the emotion and intent words only
    from the configured labels (eval.constrained; --free: unconstrained, where an answer naming no
    label is invalid). The config defaults to the one saved with the checkpoint; eval.* keys name
    the local BERTScore / BLEURT models. On run.device; under
    `torchrun --nproc_per_node N $(which xmei) eval ...` the ranks share the batches and rank 0
    scores and writes (the same predictions as one process). SIGTERM or Ctrl-C stops it at a batch
    boundary, writing nothing: OUT keeps its earlier files.
    """
    from dataclasses import replace

    from xmei.evaluate import check_out, check_references, write_evaluation
    from xmei.settings import check_store_labels

    cfg, settings = _load_checkpoint(checkpoint, config, sets, models)
    constrained = cfg.eval.constrained if constrained is None else constrained
    if compare_free and not constrained:
        _fail("--compare-free compares constrained answers with free ones: drop --free (or eval.constrained=false)")
    # a wrong path, a damaged store, one of other features or labels: an error naming it, before torch and the model load
    check_out(out)
    opened = _open_fitting(store, {checkpoint: settings})
    check_store_labels(opened, cfg.emotions, cfg.intents,
                       f"--config {config}" if config else f"the config of {checkpoint}")
    check_references(opened)  # an unlabeled store: predict, not eval
    root = _store_media_root(cfg, media_root, store) if html else None  # a bad root: an error before generating
    from xmei.data import dtype_warning
    from xmei.distributed import Distributed, resolve_precision
    from xmei.generate import GenerationError, GenerationSettings, generate_store, generation_config, label_constraint
    from xmei.interrupt import stop_on_signals
    from xmei.model import XMEIQwen
    from xmei.runlock import LOCK_NAME

    generation = replace(GenerationSettings.from_config(cfg), constrained=constrained)
    dist = Distributed.start(cfg.run.device)
    _one_run(ctx, out / LOCK_NAME, out, "--out", dist)
    stop = ctx.with_resource(stop_on_signals(cfg.run.preempt_grace_s))  # at a batch boundary, nothing written
    model = XMEIQwen.from_checkpoint(checkpoint, llm=cfg.model.llama_model_path, device=dist.device,
                                     dtype=resolve_precision(cfg.run, dist.device))
    if dist.main and (mixed := dtype_warning([store], model.settings.features.compute_dtype)):
        err.print(f"[yellow]warning:[/] {mixed}", highlight=False)
    try:
        label_constraint(model, generation)  # a max_new_tokens too short for the answer head: an error now
    except GenerationError as e:
        _fail(e)
    with _progress(disable=not dist.main) as bar:
        task = bar.add_task(f"generating ({dist.world} processes)" if dist.world > 1 else "generating", total=None)

        def advanced(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if done < total:  # after the last batch the outputs are written (within the grace)
                stop.check(f"stopped at a batch boundary after {done} of {total} clips"
                           + (f" of rank {dist.rank}" if dist.world > 1 else "") + f"; nothing was written, {out} "
                           "holds what it held before: run the same command again")

        rows, rate = generate_store(model, store, cfg.emotions, cfg.intents, generation, dist=dist, progress=advanced,
                                    compare_free=compare_free)
    dist.close()
    if not dist.main:  # rank 0 scores and writes
        return
    title = f"xmei eval: {Location.parse(store).name}"
    results = write_evaluation(rows, out, cfg.emotions, cfg.intents, cfg.eval, title, {
        "clips_per_s": rate, "checkpoint": str(checkpoint), "store": str(store), "model": "XMEI-Qwen",
        "generation": generation_config(model, generation).to_diff_dict(), "constrained": generation.constrained})
    _print_results(results)
    if "free_decoding" in results:
        free = results["free_decoding"]
        console.print("free decoding: " + ", ".join(
            f"{kind} accuracy {free[kind]['accuracy']:.4f} ({free[kind]['invalid']} invalid)"
            for kind in ("emotion", "intent")))
    console.print(f"predictions {out / 'predictions.jsonl'}, results {out / 'results.json'}, "
                  f"report {out / 'report.md'}")
    if html:
        _write_page(cfg, out, store, root, None, model)


@app.command("report")
def report_cmd(
    eval_dir: Annotated[Path, typer.Argument(metavar="DIR", help="An evaluation folder (`xmei eval --out` or "
                                                                 "`xmei score --out`) or a prediction folder "
                                                                 "(`xmei predict --out`).")],
    store: Annotated[Optional[str], typer.Option(help="The evaluated store (a folder or an s3:// gs:// az:// URL): "
                                                      "subtitles, captions and frames (a prediction folder: default "
                                                      "DIR/store).")] = None,
    media_root: Annotated[Optional[Path], typer.Option(
        help="Where the clips' videos are (default as in `xmei attention`, from the store's annotation file; a "
             "prediction folder: the one its predict.json names).")] = None,
    compare: Annotated[Optional[Path], typer.Option(help="Another evaluation of the same clips: its labels on each "
                                                         "card and a disagree filter.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The evaluated checkpoint, with --store: each clip's "
                                                            "attention maps (only its LQ-Formers load; a prediction "
                                                            "folder: default the one its predict.json names).")] = None,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Write DIR/report.html: the metric tables, the confusion matrices and a card for every clip
    (frames, waveform with its audio windows, attention with --checkpoint, subtitle, captions, reference
    vs predicted, the label probabilities as bars), filterable and sortable in the browser, no server.
    The filters are kept in the URL's fragment: report.html#outcome=intent shows the intent errors,
    #sort=p_emotion-asc the least sure emotions first. A prediction folder (no references) gets the
    count of each predicted label instead of metrics."""
    from xmei.report import prediction_folder

    cfg = _load(config, sets, models)
    found = prediction_folder(eval_dir)
    if found is not None:  # its own store, media root and checkpoint by default, where they are
        for note in found.missing:
            err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
        store, media_root = store or found.store, media_root or found.media_root
        checkpoint = checkpoint or (found.checkpoint if store is not None else None)
    if checkpoint is not None and store is None:
        _fail("--checkpoint draws the attention over a store's clips: give --store too")
    # a prediction folder's media root is the one given or its predict.json's, never a guess from the config
    root = _store_media_root(cfg, media_root, store) if store is not None and (found is None or media_root) else None
    model = None
    if checkpoint is not None:
        from xmei.checkpoint import verify_checkpoint

        _open_fitting(store, {checkpoint: verify_checkpoint(checkpoint, config=False)})  # before torch loads
        from xmei.distributed import Distributed
        from xmei.model import LQFormers

        model = LQFormers.from_checkpoint(checkpoint, Distributed.start(cfg.run.device).device)
    _write_page(cfg, eval_dir, store, root, compare, model)


def _write_page(cfg: Config, eval_dir: Path, store: str | None, root: Path | None, compare: Path | None,
                model=None) -> None:
    from xmei.report import ASSETS, build_report

    synonyms = {kind: dict(labels.synonyms) for kind, labels in (("emotion", cfg.emotions), ("intent", cfg.intents))}
    with _progress(disable=store is None) as bar:
        task = bar.add_task("report", total=None)
        page = build_report(eval_dir, store=store, media_root=root, compare=compare, synonyms=synonyms, model=model,
                            progress=lambda done, total: bar.update(task, completed=done, total=total),
                            label_sets={"emotion": cfg.emotions, "intent": cfg.intents})
    assets = page.parent / ASSETS
    size = page.stat().st_size + sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    console.print(f"wrote {page} ({size / 1e6:.1f} MB with {ASSETS}/); open it in a browser, no server needed")


@app.command("score")
def score_cmd(
    predictions: Annotated[Path, typer.Argument(help="predictions.jsonl (of `xmei eval`, or a baseline's).")],
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md and the PNGs.")],
    name: Annotated[str, typer.Option(help="Model name in the report's tables.")] = "predictions",
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Score an existing predictions file, without any model (same scoring as `xmei eval`)."""
    from xmei.evaluate import score_file

    cfg = _load(config, sets, models)
    results = score_file(predictions, out, cfg.emotions, cfg.intents, cfg.eval, name)
    _print_results(results)
    console.print(f"results {out / 'results.json'}, report {out / 'report.md'}")


def _print_results(results: dict) -> None:
    """The classification table, the explanation metrics and how many answers were cut off."""
    table = Table("", "accuracy", "weighted F1", "macro F1", "UAR", "invalid", show_edge=False)
    for kind in ("emotion", "intent"):
        r = results[kind]
        table.add_row(kind, *(f"{r[k]:.4f}" for k in ("accuracy", "weighted_f1", "macro_f1", "uar")), str(r["invalid"]))
    console.print(table)
    metrics = Table("metric", "value", show_edge=False)
    for name, value in results["explanation"].items():
        metrics.add_row(name, f"{value['value']:.4f}" if "value" in value else f"unavailable: {value['unavailable']}")
    console.print(metrics)
    for kind in ("emotion", "intent"):
        c = results[kind]["calibration"]
        console.print(f"{kind} label probabilities: " + (f"unavailable: {c['unavailable']}" if "unavailable" in c else
                      f"top-2 accuracy {c['top2_accuracy']:.4f}, ECE {c['ece']:.4f}"), highlight=False)
    if "cut_off" in results:
        console.print(f"cut off at max_new_tokens: {results['cut_off']} of {results['count']} answers")


@app.command()
def predict(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint folder.")],
    video: Annotated[Optional[Path], typer.Argument(help="One clip: an mp4 (or any video decord reads).")] = None,
    subtitle: Annotated[Optional[str], typer.Option(
        help="One clip: what the speaker says. Default: a .srt / .vtt / .txt beside the video, else speech "
             "recognition with the Whisper of model.asr_path, else none (as `xmei annotate` finds them).")] = None,
    audio: Annotated[Optional[Path], typer.Option(help="One clip: audio file; default: the video's own track.")] = None,
    video_description: Annotated[str, typer.Option(help="One clip: its video caption (LQ-Former queries).")] = "",
    audio_description: Annotated[str, typer.Option(help="One clip: its audio caption (LQ-Former queries).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="One clip: print one JSON object.")] = False,
    annotations: Annotated[Optional[Path], typer.Option(
        help="In bulk: an annotation file (labels may be empty); its clips are extracted into OUT/store.")] = None,
    store: Annotated[Optional[str], typer.Option(help="In bulk: an existing store (labeled or not; a folder or an "
                                                      "s3:// gs:// az:// URL).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="In bulk: folder for predictions.jsonl, predictions.csv, failures.jsonl, predict.json (and store/); "
             "rerun to resume.")] = None,
    media_root: Annotated[Optional[Path], typer.Option(
        help="With --annotations: folder the media paths are relative to (default as in `xmei validate`).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="With --annotations: as `xmei extract --scheduler`.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="With --annotations: as `xmei extract --workers`.")] = None,
    strict: Annotated[bool, typer.Option(help="With --annotations: stop at the first clip that fails.")] = False,
    allow_absolute_paths: Annotated[bool, typer.Option(help="With --annotations: accept absolute media paths.")] = False,
    overwrite: Annotated[bool, typer.Option(help="In bulk: start over in an OUT of another run.")] = False,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Emotion, intent and explanation of one raw clip (VIDEO), or of every clip of an annotation
    file or store in bulk (--annotations / --store with --out).

    One clip: stage 1's own decoding and encoders, then the model (xmei.predictor.Predictor).
    In bulk: --annotations extracts its clips into OUT/store with `xmei extract`'s code and
    options (resumed by a rerun), then generates for every ok clip with the model loaded once,
    run.batch_size_eval clips a batch; under `torchrun --nproc_per_node N $(which xmei) predict ...`
    the ranks share the batches as in `xmei eval` (rank 0 extracts and writes). Every finished
    batch is kept in OUT/predictions.partial.jsonl: SIGTERM or Ctrl-C stops at a batch boundary
    and a rerun predicts only the clips that have no row yet.
    """
    given = [name for name, value in (("VIDEO", video), ("--annotations", annotations), ("--store", store)) if value]
    if len(given) != 1:
        _fail(f"give exactly one of VIDEO (one clip), --annotations FILE or --store STORE (in bulk); got "
              f"{' and '.join(given) or 'none'}")
    if video is None:
        one_clip = [flag for flag, value in (("--subtitle", subtitle), ("--audio", audio), ("--json", as_json),
                    ("--video-description", video_description), ("--audio-description", audio_description)) if value]
        if one_clip:
            _fail(f"{', '.join(one_clip)}: options of one clip (VIDEO); in bulk the annotation file or store gives them")
        if out is None:
            _fail("in bulk (--annotations / --store), give --out DIR")
        _predict_bulk(ctx, checkpoint, annotations, store, out, media_root, dict(
            scheduler=scheduler, workers=workers, strict=strict, unlabeled=True), allow_absolute_paths, overwrite,
            config, sets, models)
        return
    bulk_only = [flag for flag, value in (("--out", out), ("--media-root", media_root), ("--scheduler", scheduler),
                 ("--workers", workers is not None), ("--strict", strict), ("--overwrite", overwrite),
                 ("--allow-absolute-paths", allow_absolute_paths)) if value]
    if bulk_only:
        _fail(f"{', '.join(bulk_only)}: options of bulk prediction (--annotations / --store), not of one clip")
    _predict_clip(checkpoint, video, subtitle, audio, video_description, audio_description, as_json, config, sets,
                  models)


def _predict_clip(checkpoint: Path, video: Path, subtitle: str | None, audio: Path | None, video_description: str,
                  audio_description: str, as_json: bool, config: Path | None, sets: list[str] | None,
                  models: Path | None) -> None:
    """`xmei predict VIDEO`: one Predictor.predict, printed."""
    cfg, _ = _load_checkpoint(checkpoint, config, sets, models)
    _check_clip_features(cfg, checkpoint, _config_source(config, sets, models))
    from pipeline.decode import MediaError
    from xmei.distributed import Distributed
    from xmei.predictor import Predictor

    device = Distributed.start(cfg.run.device).device
    # a GenerationError (eval.max_new_tokens shorter than the constrained answer head) ends at main's boundary
    predictor = Predictor(cfg, checkpoint, device, attention=False)
    try:
        result = predictor.predict(video, subtitle, audio, video_description, audio_description)
    except MediaError as e:
        _fail(f"cannot read the clip: {e}", 1)
    if as_json:
        console.print_json(data=result.to_json())
        return
    if result.without_descriptions:
        err.print(f"no {' or '.join(result.without_descriptions)} description given: those LQ-Formers answer "
                  "from their learned queries alone (trained so by model.caption_dropout)")
    if not result.has_audio:
        source = f"{audio} holds none" if audio else f"{video} has no audio track and no --audio was given"
        err.print(escape(f"no audio: {source}; the model answers with its learned no-audio context"), highlight=False)
    if result.subtitle_cut:
        err.print("the subtitle was cut to fit model.max_length tokens, as in training", highlight=False)
    if result.subtitle_source == "none":
        err.print("no subtitle: none given, none beside the video and no speech recognized (model.asr_path "
                  f"{'gives none' if cfg.model.asr_path else 'is not set'}); the model answers without one")
    elif result.subtitle_source != "given":
        err.print(escape(f"subtitle ({result.subtitle_source}): {result.subtitle}"), highlight=False)
    console.print(f"emotion: {result.emotion or 'invalid (unparsed)'}{_top(result.emotion_probs)}\n"
                  f"intent: {result.intent or 'invalid (unparsed)'}{_top(result.intent_probs)}"
                  f"\nexplanation: {result.explanation}"
                  + ("\n(the answer was cut off at eval.max_new_tokens)" if result.cut_off else ""), highlight=False)


def _on_rank0(dist, work) -> None:
    """``work()`` on rank 0 while the other ranks wait; when it fails, every rank ends: rank 0
    with its error, the others with one naming it."""
    error = None
    if dist.main:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - told to the other ranks, then raised as it was
            error = e
    said = dist.broadcast(None if error is None else message_of(error) or type(error).__name__)
    if error is not None:
        raise error
    if said is not None:
        dist.close()
        _fail(f"rank {dist.rank}: rank 0 stopped: {said}", 1)


def _top(probs: dict[str, float] | None, count: int = 3) -> str:
    """The most probable labels with their probabilities: "  (happy 0.91, sad 0.05, fear 0.02)"."""
    if probs is None:
        return "  (label probabilities unavailable)"
    best = sorted(probs.items(), key=lambda item: -item[1])[:count]
    return "  (" + ", ".join(f"{label} {p:.2f}" for label, p in best) + ")"


def _predict_bulk(ctx: typer.Context, checkpoint: Path, annotations: Path | None, store: Path | None, out: Path,
                  media_root: Path | None, extract_options: dict, allow_absolute_paths: bool, overwrite: bool,
                  config: Path | None, sets: list[str] | None, models: Path | None) -> None:
    """`xmei predict --annotations / --store --out`: (rank 0) extraction into OUT/store, then
    xmei.predict.predict_store on every rank, then (rank 0) the outputs."""
    from xmei.evaluate import check_out

    cfg, settings = _load_checkpoint(checkpoint, config, sets, models)
    cfg.extract.allow_absolute_paths |= allow_absolute_paths
    check_out(out)
    root = None
    if annotations is not None:
        root = _media_root(cfg, media_root, annotations)
        if root is None:
            _fail("no media root: give --media-root (or a config dataset media_root)")
        source = f"--config {config}" if config else "the checkpoint's config"
        _check_clip_features(cfg, checkpoint, source)  # the store will hold the checkpoint's features
        store = out / "store"
    elif media_root is not None:
        _fail("--media-root is an option of --annotations (a store holds its features already)")
    from dataclasses import asdict

    from xmei.distributed import Distributed, resolve_precision
    from xmei.generate import GenerationSettings
    from xmei.runlock import LOCK_NAME
    from xmei.settings import check_store_labels

    generation = GenerationSettings.from_config(cfg)
    # under several ranks the others wait for rank 0's extraction in a collective: give it a day
    dist = Distributed.start(cfg.run.device, timeout_s=86400 if annotations is not None else 1800)
    _one_run(ctx, out / LOCK_NAME, out, "--out", dist)
    if annotations is not None:
        _on_rank0(dist, lambda: _extract_store(ctx, cfg, annotations, root, store, split=None, **extract_options))
    opened = _open_fitting(store, {checkpoint: settings})
    check_store_labels(opened, cfg.emotions, cfg.intents,
                       f"--config {config}" if config else f"the config of {checkpoint}")
    from xmei.interrupt import stop_on_signals
    from xmei.model import XMEIQwen
    from xmei.predict import predict_store, start_run, subtitle_sources, write_outputs

    made_from = annotations.resolve() if annotations is not None else Path(opened.attrs.get("annotations", ""))
    facts = {"checkpoint": str(checkpoint.resolve()), "store": Location.parse(store).absolute(),
             "store_fingerprint": opened.attrs.get("fingerprint"), "annotations": str(made_from),
             "media_root": str(root.resolve()) if root else None,  # the generation settings but the batch size
             "generation": {k: v for k, v in asdict(generation).items() if k != "batch_size"}}
    _on_rank0(dist, lambda: start_run(out, facts, overwrite))  # another run's OUT: refused before the model loads
    model = XMEIQwen.from_checkpoint(checkpoint, llm=cfg.model.llama_model_path, device=dist.device,
                                     dtype=resolve_precision(cfg.run, dist.device))
    stop = ctx.with_resource(stop_on_signals(cfg.run.preempt_grace_s))
    with _progress(disable=not dist.main) as bar:
        task = bar.add_task(f"predicting ({dist.world} processes)" if dist.world > 1 else "predicting", total=None)
        rows = predict_store(model, store, out, cfg, generation, subtitle_sources(made_from), dist,
                             progress=lambda done, total: bar.update(task, completed=done, total=total), stop=stop)
    dist.close()
    if not dist.main:
        return
    record = write_outputs(out, rows, store, facts)
    console.print(f"{out}: {record['predicted']} clips predicted, {record['failed']} failed extraction"
                  + (f", {record['cut_off']} answers cut off at eval.max_new_tokens" if record["cut_off"] else "")
                  + f"; {out / 'predictions.jsonl'}, {out / 'predictions.csv'}, {out / 'failures.jsonl'}")


@app.command()
def attention(
    checkpoint: Annotated[list[Path], typer.Option(help="Checkpoint folder; give two (language vs learned) "
                                                        "to draw them side by side.")],
    store: Annotated[str, typer.Option(help="A store with patch features (a folder or an s3:// gs:// az:// URL).")],
    clip: Annotated[list[str], typer.Option(help="video_id of a clip to draw (repeatable).")],
    out: Annotated[Path, typer.Option(help="Folder for attention_<video_id>.png (frames) and "
                                           "audio_attention_<video_id>.png (audio windows).")],
    media_root: Annotated[Optional[Path], typer.Option(help="Where the clips' videos are (default as in `xmei validate`, "
                                                            "from the store's annotation file).")] = None,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Heatmaps of the LQ-Formers' cross-attention: the visual one over each sampled frame's patch
    grid, the audio one over the audio windows on the waveform (each for the models that use it)."""
    from xmei.checkpoint import verify_checkpoint

    cfg, settings = _load_checkpoint(checkpoint[0], config, sets, models)
    others = {c: verify_checkpoint(c, config=False) for c in checkpoint[1:]}
    _open_fitting(store, {checkpoint[0]: settings, **others})  # every checkpoint's files and the store's, before torch loads
    root = _store_media_root(cfg, media_root, store)
    if root is None:
        _fail("no media root: give --media-root")
    from xmei.attention import draw_attention
    from xmei.distributed import Distributed

    device = Distributed.start(cfg.run.device).device
    for video_id in clip:
        try:
            paths, notes = draw_attention(checkpoint, store, video_id, root, out, device)
        except (KeyError, ValueError) as e:  # a clip the store lacks, or one it cannot draw
            _fail(e, 1)
        for note in notes:
            err.print(f"not drawn: {escape(note)}")
        for path in paths:
            console.print(f"wrote {path}")


@app.command()
def serve(
    checkpoint: Annotated[list[Path], typer.Option(
        help="A checkpoint folder; repeat it to see the answers side by side (the demo's A+V+T, V+T and A+T: "
             "the modality ablation on your own clip).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface; the page has no "
                                           "login).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """The model in a browser: upload or record a clip, see each checkpoint's emotion and intent
    with their probabilities, the explanation as it is written, and the LQ-Formers' attention over
    the frames and the audio windows; download the whole answer as JSON.

    Every checkpoint loads once, on run.device, with its own config (--config / --set / --models
    apply to each); requests queue and run one at a time. The subtitle is filled from a sidecar file
    or speech recognition (model.asr_path) when a clip is uploaded. Clips longer than
    serve.max_seconds are refused. The page fetches nothing from outside. From Python:
    gradio_client's Client(URL).predict(handle_file("clip.mp4"), "subtitle", "", "", api_name="/predict")
    returns every checkpoint's answer as JSON. Ctrl-C stops the server.
    """
    for folder in checkpoint:  # every checkpoint's files, and the clip features it needs, before torch loads
        cfg, _ = _load_checkpoint(folder, config, sets, models)
        _check_clip_features(cfg, folder, _config_source(config, sets, models))
    _check_port(host, port)
    import logging

    from xmei.serve import Service
    from xmei.serve_page import serve as serve_page

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("xmei.serve").addHandler(handler)
    logging.getLogger("xmei.serve").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the console is the server's log: one line a request
    service = Service.load(checkpoint, None, config, sets or [], models)
    signal.signal(signal.SIGTERM, _as_ctrl_c)  # a scheduler's stop closes the server as Ctrl-C does
    try:
        names = ", ".join(m.name for m in service.models)
        console.print(f"serving {names} on http://{host}:{port} ({service.models[0].predictor.device}, clips up to "
                      f"{service.max_seconds:g} s); Ctrl-C stops", highlight=False)
        serve_page(service, host, port)
    finally:
        service.close()


def _as_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_port(host: str, port: int) -> None:
    """A port another program listens on ends the command before any model loads (status 2)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed one's port is free
        try:
            probe.bind((host, port))
        except OSError as e:
            _fail(f"cannot listen on {host}:{port} ({e.strerror}): give another --port")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes (reused by a rerun).")] = Path("runs/demo"),
    clips: Annotated[int, typer.Option(help="Synthetic clips (70/15/15 train/val/test).")] = 800,
    epochs: Annotated[int, typer.Option(help="Training epochs of A+V+T and the Q-Former (the one-modality "
                                             "models train half as long).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the corpus and the models.")] = 0,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config of every stage "
                                                   "(default: configs/tiny.yaml).")] = None,
    sets: SetOpt = None, models: ModelsOpt = None,
):
    """The whole system on CPU: synthetic corpus -> tiny models -> extract -> train -> eval -> report.

    Trains the seed's table (A+V+T, V+T, A+T with language queries, and the learned-query
    Q-Former); evaluates each on the test split with constrained labels, and A+V+T also decoding
    freely, without descriptions, with the features zeroed and with absent audio unflagged;
    draws the attention maps over frames and audio windows. Rerunnable.
    """
    from xmei.demo import DEFAULT_CONFIG, DemoSettings, run_demo

    config = config or DEFAULT_CONFIG
    _load(config, sets, models)  # errors in the options before anything runs
    with _progress(unit="items") as bar:
        task = bar.add_task("working", total=None)

        def advanced(*args) -> None:
            if len(args) == 3:  # training: (step, total, record)
                step, total, record = args
                if "loss" in record:
                    bar.update(task, description=f"training, loss {record['loss']:.3f}", completed=step, total=total)
            else:  # extraction: (clips, failed)
                bar.update(task, description="extracting", advance=args[0], total=None)

        summary = run_demo(out, DemoSettings(clips, seed, epochs), say=bar.console.print, progress=advanced,
                           config=config, sets=sets or [], models=models)
    _print_demo(summary)


def _print_demo(summary: dict) -> None:
    """The seed's table against chance, A+V+T's explanation metrics, the modality check and where the files are."""
    table = Table("test split", "emotion acc", "intent acc", "emotion W-F1", "intent W-F1", "invalid",
                  "emotion p(true)", "intent p(true)", show_edge=False)
    for name, r in summary["results"].items():
        table.add_row(name, *(f"{r[k]:.3f}" for k in ("emotion_accuracy", "intent_accuracy", "emotion_weighted_f1",
                                                      "intent_weighted_f1")), str(r["invalid"]),
                      *("-" if r[k] is None else f"{r[k]:.3f}" for k in ("emotion_true_p", "intent_true_p")))
    chance = summary["chance"]
    table.add_row("chance", f"{chance['emotion']:.3f}", f"{chance['intent']:.3f}", "", "", "", f"{chance['emotion']:.3f}",
                  f"{chance['intent']:.3f}")
    console.print(table)
    metrics = Table("explanation (A+V+T)", "value", show_edge=False)
    for name, value in summary["results"]["A+V+T"]["explanation"].items():
        metrics.add_row(name, f"{value['value']:.4f}" if "value" in value else f"unavailable: {value['unavailable']}")
    console.print(metrics)
    check = summary["check"]
    console.print(f"modality check {'holds' if check['holds'] else 'FAILS'}: "
                  + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in check["checks"].items()))
    check = summary["probability_check"]
    console.print(f"label probabilities check {'holds' if check['holds'] else 'FAILS'}: "
                  + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in check["checks"].items()), highlight=False)
    console.print(f"report (the table, the ablations, the explanation metrics): {summary['report']}")
    for name, path in summary["reports"].items():
        console.print(f"report ({name}): {path}")
    console.print(f"confusion matrices: {', '.join(summary['confusion'])}")
    console.print(f"attention maps: {', '.join(summary['attention'])}")
    console.print(f"browsable page (every test clip, A+V+T beside the Q-Former; open it in a browser): "
                  f"{summary['page']}")
    console.print(f"the models on your own clips, side by side in a browser: {summary['serve']}", highlight=False)
    console.print(f"elapsed: {summary['seconds'] / 60:.1f} minutes")


@stores_app.command("info")
def stores_info(store: Annotated[str, typer.Argument(help="A feature store: a folder or an s3:// gs:// az:// URL.")],
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Shapes, bytes, status counts and encoders of a store."""
    from stores import FeatureStore, store_info

    info = store_info(FeatureStore(store))
    if as_json:
        console.print_json(data=info)
        return
    status = ", ".join(f"{v} {k}" for k, v in info["status"].items())
    console.print(f"[bold]{info['path']}[/] split {info['split']}: {info['clips']} clips ({status}) in "
                  f"{info['shards']} shards of {info['shard_size']}, {info['bytes'] / 1e6:.1f} MB")
    table = Table("array", "shape", "dtype", "MB", show_edge=False)
    for name, a in info["arrays"].items():
        table.add_row(name, str(tuple(a["shape"])), a["dtype"], f"{a['bytes'] / 1e6:.2f}")
    console.print(table)
    for kind, enc in (info["encoders"] or {}).items():
        console.print(f"{kind}: {enc.get('name', '')} {enc['path']} (config {enc['config_sha256']})")
    console.print(f"extraction: {info['extract']}")


@stores_app.command("verify")
def stores_verify(store: Annotated[str, typer.Argument(help="A feature store: a folder or an s3:// gs:// az:// URL.")]):
    """Read every chunk of every array: shapes and dtypes, damaged or missing shard files, NaN/Inf, and that
    status agrees with the data and the failures log; lists every problem, exit 1 on any."""
    from stores import FeatureStore, verify_store

    opened = FeatureStore(store)
    problems = verify_store(opened)
    if problems:
        _fail_with_problems(str(store), problems)
    console.print(f"[green]{store}: ok[/] ({len(opened)} clips verified)")


@stores_app.command("export")
def stores_export(store: Annotated[str, typer.Argument(help="A feature store: a folder or an s3:// gs:// az:// URL.")],
                  h5: Annotated[Path, typer.Argument(metavar="OUT.h5", help="HDF5 file to write.")],
                  overwrite: Annotated[bool, typer.Option(
                      help="Replace OUT.h5 if it exists (once the new file is whole).")] = False):
    """Write a store to one HDF5 file (same arrays and attributes)."""
    from stores import FeatureStore, export_hdf5

    export_hdf5(FeatureStore(store), h5, overwrite=overwrite)  # an existing OUT.h5 is an error without --overwrite
    console.print(f"wrote {h5} ({h5.stat().st_size / 1e6:.1f} MB)")


@stores_app.command("copy")
def stores_copy(ctx: typer.Context,
                source: Annotated[str, typer.Argument(help="The store to copy: a folder or an s3:// gs:// az:// URL.")],
                dest: Annotated[str, typer.Argument(help="Where the copy goes (nothing there yet): a folder or a "
                                                         "URL.")]):
    """Copy a whole store between a folder and object storage (either way, or two of a kind), file by
    file, streamed: to move stores made on one machine into a bucket, or back. Into a folder through
    DEST.partial-<pid>, renamed when whole; to a URL with its attributes written last, so a copy cut
    off is refused as incomplete and the same command starts it again. `xmei stores verify DEST`
    then reads every clip."""
    from stores.store import copy_store
    from xmei.runlock import store_lock

    _one_run(ctx, store_lock(dest), dest, "DEST")  # two copies (or an extraction) into one place: one at a time
    with _progress(unit="MB") as bar:
        task = bar.add_task("copying", total=None)
        copied = copy_store(source, dest, progress=lambda done, total: bar.update(task, completed=round(done / 1e6),
                                                                                  total=round(total / 1e6)))
    console.print(f"copied {source} to {copied.where} ({len(copied)} clips); `xmei stores verify {copied.where}` reads "
                  "every clip")


@stores_app.command("import")
def stores_import(h5: Annotated[Path, typer.Argument(metavar="IN.h5", help="HDF5 file in the export layout.")],
                  store: Annotated[str, typer.Argument(help="The store to create: a folder or an s3:// gs:// az:// "
                                                            "URL.")]):
    """Create a store from an HDF5 file, then check it as `stores verify` does."""
    from stores import import_hdf5, verify_store

    try:
        imported = import_hdf5(h5, store)
    except OSError as e:  # an unreadable file (a StoreError, an unusable one, ends at main's boundary)
        _fail(e, 1)
    problems = verify_store(imported)
    console.print(f"imported {len(imported)} clips into {store}; verify: {len(problems) or 'no'} problem(s)")
    for p in problems:
        err.print(f"  {escape(p)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@models_app.command("tiny")
def models_tiny(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the model set into.")],
    seed: Annotated[int, typer.Option(help="Weights and tokenizer are a function of the seed.")] = 0,
    config: ConfigOpt = None, sets: SetOpt = None, models: ModelsOpt = None,
):
    """Write a tiny random-init model set (CLIP vision, HuBERT, Qwen2 + BPE tokenizer, caption
    tokenizer) as ordinary save_pretrained folders. Point a config at it with --models OUT."""
    from pipeline.synth import text_corpus
    from pipeline.tiny_models import build_tiny_models

    cfg = _load(config, sets, models)
    # the BPE vocab is learned from the texts a synthetic corpus holds, plus the configured labels
    texts = [*text_corpus(seed=seed), *cfg.labels.emotions, *cfg.labels.intents]
    paths = build_tiny_models(out_dir, seed=seed, texts=texts)
    for name, path in paths.items():
        console.print(f"{name:18} {path}")


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else f"- {self.unit}/s")


def _progress(*extra: ProgressColumn, unit: str = "clips", disable: bool = False) -> Progress:
    """Done / total, rate, elapsed and remaining time (plus ``extra`` columns), on stderr."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit), *extra,
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, disable=disable)


def main() -> None:
    """The boundary of every command: a UserError (a bad file, record, store, checkpoint, config,
    device ...) ends with its message and exit status 1; an Interrupted (a signal) with its message
    and status 128 + the signal's number; any other exception is a bug and keeps its traceback."""
    try:
        app()
    except UserError as e:
        if debugging():
            raise
        _say_error(e)
        sys.exit(1)
    except Interrupted as e:  # a signal stopped a long run (xmei.interrupt): where, and what is kept
        if debugging():
            raise
        _say_error("; ".join([str(e), *getattr(e, "__notes__", [])]))
        sys.exit(e.exit_status)


if __name__ == "__main__":
    sys.exit(main())
