"""The `xmei` command. Thin: it parses options and calls the packages.

Every command takes ``--config FILE`` (defaults: the published values and MC-EIU label sets),
repeatable ``--set section.key=value`` and ``--models DIR`` (a folder laid out as
``xmei models tiny`` writes it, which overrides the checkpoint paths).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.columns import Columns
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from xmei.config import Config, ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="xmei: joint multimodal emotion-intent classification and explanation (JX4MEI).")
models_app = typer.Typer(no_args_is_help=True, help="Model folders for tests, demos and smoke runs.")
app.add_typer(models_app, name="models")
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one key, e.g. --set run.init_lr=1e-4 (repeatable).")]
ModelsOpt = Annotated[Optional[Path], typer.Option(
    "--models", help="Folder laid out as `xmei models tiny` writes it; overrides the checkpoint paths.")]


def _config(config: Path | None, sets: list[str] | None, models: Path | None) -> Config:
    """Load the config; warnings and errors go to stderr, errors exit with status 2."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = load_config(config, sets or [], models)
        except ConfigError as e:
            _fail(str(e))
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    return cfg


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command("config")
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None, models: ModelsOpt = None,
               check: Annotated[bool, typer.Option(help="Also check that every configured path exists.")] = False):
    """Print the resolved config as YAML (after --set and --models)."""
    cfg = _config(config, set_, models)
    out.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", highlight=False)
    if check:
        keys = [f"model.{k}" for k in ("visual_encoder_path", "acoustic_encoder_path",
                                       "llama_model_path", "caption_tokenizer_path")]
        for name, ds in cfg.datasets.items():
            keys.append(f"datasets.{name}.media_root")
            keys += [f"datasets.{name}.annotations.{split}" for split in ds.annotations]
        try:
            cfg.require_paths(keys)
        except ConfigError as e:
            _fail(f"missing paths:\n{e}", 1)
        err.print(f"all {len(keys)} configured paths exist")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the corpus into.")],
    n: Annotated[int, typer.Option("--n", help="Number of clips (split 70/15/15 into train/val/test).")] = 200,
    seed: Annotated[int, typer.Option(help="Everything is a function of the seed.")] = 0,
    workers: Annotated[Optional[int], typer.Option(help="Rendering processes (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a folder that already holds a corpus.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None, models: ModelsOpt = None,
):
    """Write a synthetic corpus of real mp4/wav files in the published dataset layout.

    Emotion is carried by what is seen (a drawn face's color, mouth, brows, motion), intent by
    what is heard (pitch register, contour and rhythm of voiced tones); the texts mention the
    cues only partly and noisily.
    """
    from pipeline.synth import synth_corpus

    cfg = _config(config, set_, models)
    with _progress() as bar:
        task = bar.add_task("rendering clips", total=n)
        try:
            counts = synth_corpus(out_dir, n, seed, cfg.emotions, cfg.intents, workers=workers,
                                  overwrite=overwrite, progress=lambda k: bar.advance(task, k))
        except (ValueError, FileExistsError) as e:
            _fail(str(e))
    split_text = ", ".join(f"{k} {v}" for k, v in counts.items())
    out.print(f"wrote {n} clips to {out_dir} ({split_text}); annotations in {out_dir / 'annotations'}")


@app.command()
def validate(
    annotations: Annotated[Path, typer.Argument(help="Annotation file: JSON list or JSONL.")],
    media_root: Annotated[Optional[Path], typer.Option(
        help="Folder the media paths are relative to. Default: the config's dataset media_root, "
             "else the folder above annotations/ (published layout).")] = None,
    unlabeled: Annotated[bool, typer.Option(help="Allow empty emotion/intent (a prediction-only split).")] = False,
    config: ConfigOpt = None, set_: SetOpt = None, models: ModelsOpt = None,
):
    """Check an annotation file against the contract; list every problem and exit 1 if any."""
    from pipeline.annotations import check_annotations, default_media_root

    cfg = _config(config, set_, models)
    if media_root is None:
        media_root = _config_media_root(cfg) or default_media_root(annotations)
    if media_root is not None and not media_root.is_dir():
        _fail(f"media root {media_root} is not a folder")
    records, problems, summary = check_annotations(annotations, cfg.emotions, cfg.intents,
                                                   media_root, labeled=not unlabeled)
    out.print(f"[bold]{annotations}[/]: {summary.count} records, {len(records)} valid; "
              f"media root {media_root or '(none: media not checked)'}")
    tables = []
    for title, dist in (("emotion", summary.emotions), ("intent", summary.intents)):
        table = Table(title, "clips", show_edge=False)
        for label, count in dist.items():
            table.add_row(label, str(count))
        tables.append(table)
    out.print(Columns(tables, padding=(0, 6)))
    out.print(f"audio: {summary.audio_from_file} from audio files, "
              f"{summary.audio_from_video_track} from the video's own track (empty audio_path)")
    if summary.extra_fields:
        out.print(f"fields beyond the published 11, ignored: {', '.join(summary.extra_fields)}")
    if summary.missing_media:
        out.print(f"[red]{len(summary.missing_media)} clip(s) with missing media:[/] "
                  + ", ".join(summary.missing_media))
    if problems:
        err.print(f"[red]{len(problems)} problem(s):[/]")
        for p in problems:
            err.print(f"  {p}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print("[green]ok[/]")


def _config_media_root(cfg: Config) -> Path | None:
    """The media root of the config's only dataset, checked to exist; None when not set."""
    roots = {name: ds.media_root for name, ds in cfg.datasets.items() if ds.media_root is not None}
    if len(roots) != 1:
        return None
    (name, root), = roots.items()
    try:
        cfg.require_paths([f"datasets.{name}.media_root"])
    except ConfigError as e:
        _fail(str(e))
    return root


@models_app.command("tiny")
def models_tiny(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the model set into.")],
    seed: Annotated[int, typer.Option(help="Weights and tokenizer are a function of the seed.")] = 0,
    config: ConfigOpt = None, set_: SetOpt = None, models: ModelsOpt = None,
):
    """Write a tiny random-init model set (CLIP vision, HuBERT, Qwen2 + BPE tokenizer, caption
    tokenizer) as ordinary save_pretrained folders. Point a config at it with --models OUT."""
    from pipeline.synth import text_corpus
    from pipeline.tiny_models import build_tiny_models

    cfg = _config(config, set_, models)
    # the BPE vocab is learned from the texts a synthetic corpus holds, plus the configured labels
    texts = [*text_corpus(seed=seed), *cfg.labels.emotions, *cfg.labels.intents]
    paths = build_tiny_models(out_dir, seed=seed, texts=texts)
    for name, path in paths.items():
        out.print(f"{name:18} {path}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
