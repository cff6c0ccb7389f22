"""A checkpoint folder, and the checks that run before anything loads from it.

    RUN/checkpoints/step_NNNNNNN/   (`xmei train` writes step_NNNNNNN.partial, then renames it)
        xmei_model.json             the settings: the config's model section and stage 1's feature facts
        config.yaml                 the resolved run config
        trainable.safetensors       the LQ-Formers and projections
        adapter/                    LoRA runs: adapter_config.json, adapter_model.safetensors (peft)
        llm/                        runs that trained the whole LLM: its weights and tokenizer
        trainer_state.pt            `xmei train --resume` only (xmei.train), and with --engine
        deepspeed/state/            deepspeed the ZeRO states

The checks are cheap: the files are there, JSON and YAML parse, each safetensors header parses
and its file is exactly as long as the header says, each torch file's zip directory reads. They
run before the loads, and the loads themselves run inside ``loading`` so that whatever is still
wrong names its file. Every failure is a :class:`CheckpointError`. No torch here: a command
checks a checkpoint (``verify_checkpoint``) before it imports torch, transformers or peft.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from xmei import errors
from xmei.config import Config, ModelConfig
from xmei.errors import UserError
from xmei.settings import XMEISettings

__all__ = ["ADAPTER_FILES", "CHECKPOINT_FILES", "CheckpointError", "check_deepspeed", "check_files",
           "check_safetensors", "check_tensors", "check_torch_file", "checkpoint_folder", "checkpoints", "llm_shards",
           "loading", "read_json", "verify_checkpoint"]

CHECKPOINT_FILES = {"settings": "xmei_model.json", "trainable": "trainable.safetensors", "adapter": "adapter",
                    "llm": "llm", "config": "config.yaml"}
ADAPTER_FILES = {"config": "adapter_config.json", "weights": "adapter_model.safetensors"}  # peft's names
STEP = re.compile(r"step_\d+")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DAMAGED = "cut off or overwritten?"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded; the message names the folder or file and what is wrong."""


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first: folders named step_N only (a ``.partial``
    one was cut off by a kill while being written; one renamed aside, e.g. ``step_N.damaged``, is
    left alone)."""
    return sorted(p for p in Path(run_dir).glob("checkpoints/step_*") if STEP.fullmatch(p.name) and p.is_dir())


def checkpoint_folder(folder: str | Path) -> Path:
    """``folder`` when it is a checkpoint (it holds xmei_model.json); else an error saying what it
    is instead: missing, cut off while being written, a run folder (naming its newest checkpoint)."""
    folder = Path(folder)
    settings = folder / CHECKPOINT_FILES["settings"]
    if folder.name.endswith(".partial") and folder.is_dir():
        done = checkpoints(folder.parent.parent)
        instead = f": use a finished one, e.g. the newest, {done[-1]}" if done else ""
        raise CheckpointError(f"{folder} was cut off while being written (a .partial checkpoint never "
                              f"finished){instead}")
    if settings.is_file():
        return folder
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder")
    done = checkpoints(folder.parent if folder.name == "checkpoints" else folder)
    if done:
        raise CheckpointError(f"{folder} is a training run's folder, not a checkpoint: give one of its checkpoints, "
                              f"e.g. the newest, --checkpoint {done[-1]}")
    if any((folder / CHECKPOINT_FILES[k]).exists() for k in ("trainable", "adapter")):
        raise CheckpointError(f"{settings} is missing (the checkpoint's settings)")
    raise CheckpointError(f"{folder} is not an xmei checkpoint (it has no {CHECKPOINT_FILES['settings']})")


def verify_checkpoint(folder: str | Path, config: bool = True) -> XMEISettings:
    """The settings of a checkpoint folder, after the cheap checks of every file it needs (present,
    JSON / YAML parse, safetensors headers match their files' sizes; config.yaml when ``config``):
    a damaged file, a folder that is not a checkpoint, settings of another layout are a
    CheckpointError naming it. The tensors are not read."""
    folder = checkpoint_folder(folder)
    settings = _settings(folder / CHECKPOINT_FILES["settings"])
    check_files(folder, settings.llm_part, config)
    return settings


def _settings(path: Path) -> XMEISettings:
    """The model settings in ``path``; a checkpoint of an earlier layout or unknown keys are a CheckpointError."""
    data = read_json(path, "the checkpoint's settings")
    if set(data) != {"model", "features"} or not all(isinstance(data[k], dict) for k in data):
        raise CheckpointError(f"{path}: model settings of an earlier xmei (keys {sorted(data)[:4]}...); "
                              "retrain with this version")
    unknown = sorted(set(data["model"]) - set(ModelConfig.model_fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown model settings {unknown} (a newer xmei?)")
    try:
        return XMEISettings.from_json(data)
    except (TypeError, ValueError) as e:  # a feature fact missing or unknown, a setting of the wrong type
        raise CheckpointError(f"{path}: model settings of another xmei: {e}") from None


def check_files(folder: Path, llm_part: str | None, config: bool = True) -> None:
    """Every file of a checkpoint besides its settings: the trainable weights; the adapter
    (``llm_part`` "adapter") or the whole LLM ("llm"); config.yaml, where there is one, when ``config``."""
    check_safetensors(folder / CHECKPOINT_FILES["trainable"])
    if llm_part == "adapter":
        adapter = _folder(folder / CHECKPOINT_FILES["adapter"], "the LoRA adapter")
        read_json(adapter / ADAPTER_FILES["config"], "the LoRA adapter's config")
        check_safetensors(adapter / ADAPTER_FILES["weights"])
    elif llm_part == "llm":
        llm = _folder(folder / CHECKPOINT_FILES["llm"], "the trained LLM")
        for path in sorted(llm.glob("*.json")):  # config, tokenizer, generation config, shard index
            read_json(path, "a file of the trained LLM")
        for shard in llm_shards(llm):
            check_safetensors(shard)
    saved = folder / CHECKPOINT_FILES["config"]
    if config and saved.exists():
        _check_config(saved)


def llm_shards(llm: Path) -> list[Path]:
    """The weight files of a whole LLM that ``save_pretrained`` wrote into ``llm``: the shards its
    index names, else the one model.safetensors."""
    index = llm / "model.safetensors.index.json"
    if not index.is_file():
        return [llm / "model.safetensors"]
    names = read_json(index, "the trained LLM's weight index").get("weight_map", {}).values()
    return [llm / name for name in sorted(set(names))]


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing ({what})")
    return path


def read_json(path: Path, what: str = "a checkpoint file") -> dict:
    """The JSON object in ``path`` (``what`` it holds); missing, not JSON or not an object is a
    CheckpointError naming it (:func:`xmei.errors.read_json`)."""
    return errors.read_json(path, what, CheckpointError)


# config sections added after checkpoints were first written: an earlier checkpoint's config.yaml
# lacks them and takes their defaults (each is written before `labels`, so a cut-off file still shows)
LATER_SECTIONS = ("serve", "stores")


def _check_config(path: Path) -> None:
    """config.yaml parses to a mapping with every section xmei writes (a cut-off file lacks the
    last), but those of LATER_SECTIONS."""
    try:
        raw = yaml.safe_load(errors.read_text(path, "the run's config", CheckpointError))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({DAMAGED}): {' '.join(str(e).split())}") from None
    sections = list(Config.model_fields)
    lacking = [s for s in sections if (not isinstance(raw, dict) or s not in raw) and s not in LATER_SECTIONS]
    if lacking:
        raise CheckpointError(f"{path}: lacks the config sections {lacking} that xmei writes ({DAMAGED})")


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes, from a safetensors file's header, after checking that the file is
    exactly as long as the header says (8 bytes of header length, the JSON header, then the
    tensors' bytes end to end). Reads the header only."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        if 8 + length > size:
            raise CheckpointError(f"{path}: not a whole safetensors file, {size} bytes ({DAMAGED})")
        try:
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            shapes, end = {}, 0
            for name, info in header.items():
                start, stop = info["data_offsets"]
                shapes[name] = tuple(int(n) for n in info["shape"])
                itemsize = DTYPE_BYTES.get(info["dtype"])
                if itemsize is not None and stop - start != math.prod(shapes[name]) * itemsize:
                    raise ValueError(name)
                end = max(end, stop)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file, its header does not parse ({DAMAGED})") from None
    if 8 + length + end != size:
        raise CheckpointError(f"{path}: {size} bytes where its header says {8 + length + end} ({DAMAGED})")
    return shapes


def check_tensors(path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """The names and shapes of a file's tensors against the model's: a checkpoint of another model
    size or layout is an error naming the file."""
    wrong = [f"{k} {list(found[k])} (this model: {list(expected[k])})" for k in sorted(expected.keys() & found.keys())
             if tuple(found[k]) != tuple(expected[k])]
    problems = [f"{what} {_few(items)}" for what, items in (
        ("lacks", sorted(expected.keys() - found.keys())), ("has unknown", sorted(found.keys() - expected.keys())),
        ("has the wrong shapes:", wrong)) if items]
    if problems:
        raise CheckpointError(f"{path} does not fit this model (a checkpoint of another model size or "
                              f"version?): it {'; it '.join(problems)}")


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_torch_file(path: Path) -> None:
    """A torch.save file (a zip archive) is there and whole: its directory, at the end, reads and
    every member lies inside the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            whole = all(m.header_offset + m.compress_size <= size for m in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        whole = False
    if not whole:
        raise CheckpointError(f"{path}: not a whole torch file ({DAMAGED})")


def check_deepspeed(folder: Path, rank: int) -> None:
    """A DeepSpeed checkpoint tag folder: its model states and this rank's optimizer states, whole."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing (the DeepSpeed states; a run trained with --engine torch "
                              "resumes with --engine torch)")
    optimizer = sorted(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"))
    if not optimizer or not list(folder.glob("*model_states.pt")):
        raise CheckpointError(f"{folder} lacks the {'optimizer' if not optimizer else 'model'} states of rank {rank}")
    for path in sorted(folder.glob("*.pt")):
        check_torch_file(path)


@contextmanager
def loading(path: Path):
    """Any failure of the load inside becomes a CheckpointError naming ``path`` (the original
    chained: ``--debug`` shows its traceback)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        said = " ".join(str(e).split()[:60]) or "no message"  # a size mismatch lists every tensor
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {said}") from e
