"""XMEI-Qwen: an LQ-Former per modality whose outputs take the places of the prompt's placeholder
tokens in a (LoRA-tuned) Qwen2.5 causal LM.

    video (B, F, T, Dv) --video_lqformer--> (B, Qv, H) --video_proj--> (B, Qv, E) -> <ImageHere> x Qv
    audio (B, W, Da)    --audio_lqformer--> (B, Qa, H) --audio_proj--> (B, Qa, E) -> <AudioHere> x Qa

``model.modalities`` picks the branches built ([video, audio], or one of them: the A+T / V+T
ablations); a clip without audio (``has_audio`` 0) gives the audio LQ-Former its learned
"absent" context instead of zeros. Only the LQ-Formers, the projections and the LoRA adapter
(plus any ``lora_modules_to_save``) train.

Precision (xmei.distributed): the model computes in ``dtype`` (bf16 or fp32). The frozen LLM is
loaded in it; every trainable weight is fp32 (checked when the model is built), and ``forward``
and ``generate`` run under ``torch.autocast(dtype)`` themselves, so a training engine, eval or
predict cannot run them otherwise. A checkpoint is a folder: ``trainable.safetensors``
(LQ-Formers + projections), ``adapter/`` (peft ``save_pretrained``), ``xmei_model.json`` (the
settings: the config's model section as it is, and stage 1's feature facts) and ``config.yaml``
(the resolved run config, when given); loading never unpickles, and checks every file first
(``verify_checkpoint``, xmei.checkpoint): a damaged one is an error naming it.

The two placeholders are the only tokens added to the LLM's tokenizer (the delimiters are plain
text). Where the embedding table has no spare rows for them it grows, and the new input and
output rows are set to zero, not drawn at random: the inputs are replaced by the modality tokens
anyway, and a checkpoint reloaded later rebuilds exactly the rows it trained with.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from xmei.checkpoint import (ADAPTER_FILES, CHECKPOINT_FILES, CheckpointError, check_safetensors, check_tensors,
                             llm_shards, loading, verify_checkpoint)
from xmei.lqformer import LQFormer
from xmei.prompt import AUDIO_TOKEN, PLACEHOLDER_TOKENS, VIDEO_TOKEN, PromptBuilder
from xmei.settings import MODALITIES, FeatureFacts, XMEISettings

# FeatureFacts, XMEISettings (xmei.settings) and verify_checkpoint (xmei.checkpoint) are torch-free: a
# command checks its inputs with them before it imports this module; they are named here too
__all__ = ["CHECKPOINT_FILES", "FeatureFacts", "LQFormers", "XMEIQwen", "XMEISettings", "llm_tokenizer",
           "load_weights", "verify_checkpoint"]

PLACEHOLDERS = dict(zip(MODALITIES, (VIDEO_TOKEN, AUDIO_TOKEN)))


def load_weights(folder: str | Path, modules: dict[str, nn.Module], partial: bool = False) -> None:
    """Load a checkpoint folder's trainable weights into ``modules`` ({key prefix: module}); the
    file's names and shapes are checked against the modules' first (another model size is an error
    naming the file). ``partial``: the file may hold other modules too, which are not read."""
    from safetensors import safe_open

    file = Path(folder) / CHECKPOINT_FILES["trainable"]
    found = check_safetensors(file)
    if partial:
        found = {k: v for k, v in found.items() if k.split(".", 1)[0] in modules}
    check_tensors(file, found, {f"{name}.{k}": tuple(v.shape) for name, module in modules.items()
                                for k, v in module.state_dict().items()})
    with loading(file), safe_open(str(file), "pt") as weights:
        for name, module in modules.items():
            module.load_state_dict({k[len(name) + 1:]: weights.get_tensor(k) for k in found if k.startswith(name + ".")})


class LQFormers(nn.Module):
    """A checkpoint's LQ-Formers without its LLM: all that attention maps need (a 7B LLM is not
    loaded for them). Attributes as :class:`XMEIQwen`'s: ``settings``, ``video_lqformer``, ..."""

    def __init__(self, settings: XMEISettings):
        super().__init__()
        self.settings = settings
        for modality in settings.modalities:
            setattr(self, f"{modality}_lqformer", LQFormer(settings.lqformer(modality)))

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: torch.device | str = "cpu") -> "LQFormers":
        settings = verify_checkpoint(folder, config=False)
        model = cls(settings)
        load_weights(folder, {f"{m}_lqformer": getattr(model, f"{m}_lqformer") for m in settings.modalities},
                     partial=True)
        return model.to(device).eval()


def llm_tokenizer(path: str | Path):
    """The LLM's tokenizer, with the placeholder tokens: prompts can be built (and checked against
    model.max_length) with it before the LLM loads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _add_placeholder_tokens(tokenizer)
    return tokenizer


def _add_placeholder_tokens(tokenizer) -> None:
    """Give the placeholders token ids (a real Qwen tokenizer lacks them)."""
    missing = [t for t in PLACEHOLDER_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def _add_placeholders(llm: nn.Module, tokenizer) -> None:
    """Give the placeholders token ids and, where the embedding table has no row for them, new rows
    of zeros (input and output): deterministic, so the rows a checkpoint is evaluated with are the
    rows it trained with."""
    _add_placeholder_tokens(tokenizer)
    rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[rows:] = 0
            if llm.get_output_embeddings() is not None:
                llm.get_output_embeddings().weight[rows:] = 0


def _peft_model(llm: nn.Module, lora) -> nn.Module:
    """peft's get_peft_model, without the FutureWarning of transformers 5 that peft 0.21 triggers on
    every model (it reads the deprecated ``is_gradient_checkpointing``): noise in every command."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(llm, lora)


def _load_llm(path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The LLM straight onto ``device`` in ``dtype``: the weights are read shard by shard into
    place, so no rank holds a full host copy of a 7B model first."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})


class XMEIQwen(nn.Module):
    def __init__(self, settings: XMEISettings, llm: nn.Module | None = None, tokenizer=None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """Wrap ``llm`` and ``tokenizer``, each loaded from ``model.llama_model_path`` when not given
        (the LLM onto ``device``: in ``dtype`` when it stays frozen or gets an adapter, in fp32 when
        it trains whole); the LQ-Formers and projections are put on the LLM's device. ``dtype``:
        what the forward computes in (bf16 or fp32)."""
        super().__init__()
        m = settings.model
        if tokenizer is None:
            tokenizer = llm_tokenizer(m.llama_model_path)
        if llm is None:
            whole = not m.frozen_llm and not m.use_lora  # trained whole: fp32 master weights
            llm = _load_llm(str(m.llama_model_path), torch.device(device), torch.float32 if whole else dtype)
        self.settings, self.tokenizer, self.dtype = settings, tokenizer, dtype
        _add_placeholders(llm, tokenizer)
        self.placeholder_ids = {modality: tokenizer.convert_tokens_to_ids(PLACEHOLDERS[modality])
                                for modality in settings.modalities}
        self.llm = self._wrap_llm(llm)
        hidden = llm.config.hidden_size
        for modality in settings.modalities:  # attribute names are the checkpoint's keys
            lqformer = LQFormer(settings.lqformer(modality))
            if m.caption_embeddings_from is not None and m.query_mode == "language":
                lqformer.load_caption_embeddings(m.caption_embeddings_from)
            setattr(self, f"{modality}_lqformer", lqformer)
            proj = nn.Linear(m.qformer_hidden_size, hidden)
            nn.init.normal_(proj.weight, std=0.02)  # as the LQ-Formers' own layers (BLIP-2)
            nn.init.zeros_(proj.bias)
            setattr(self, f"{modality}_proj", proj)
        for module in self.trainable_modules().values():
            module.to(llm.get_input_embeddings().weight.device)
        self.trainable_in_fp32()
        if m.gradient_checkpointing:
            for modality in settings.modalities:
                self.lqformers[modality].gradient_checkpointing = True
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def trainable_in_fp32(self) -> None:
        """Every trainable weight in fp32 (peft's copies of ``lora_modules_to_save`` take the frozen
        LLM's dtype): the master weights of either engine. Call again after requires_grad changes."""
        for p in self.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

    def autocast(self):
        """The forward's precision: ``torch.autocast`` to ``self.dtype`` on the LLM's device (off in fp32)."""
        device = self.llm.get_input_embeddings().weight.device
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @property
    def lqformers(self) -> dict[str, LQFormer]:
        return {m: getattr(self, f"{m}_lqformer") for m in self.settings.modalities}

    def _wrap_llm(self, llm: nn.Module) -> nn.Module:
        s = self.settings.model
        llm.requires_grad_(not s.frozen_llm and not s.use_lora)  # trained whole only without adapter
        if s.frozen_llm or not s.use_lora:
            return llm
        from peft import LoraConfig

        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                          target_modules=list(s.lora_target_modules), modules_to_save=list(s.lora_modules_to_save) or None,
                          task_type="CAUSAL_LM")
        return _peft_model(llm, lora)

    # ------------------------------------------------------------------ forward

    def modality_tokens(self, batch: dict[str, torch.Tensor], output_attentions: bool = False):
        """{modality: (B, Q, E)} in the LLM's embedding space for the model's modalities, and the
        LQ-Former outputs (for their cross-attention weights). A clip with ``has_audio`` 0 gets
        the audio LQ-Former's learned absent context."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        tokens, outputs = {}, {}
        with self.autocast():
            for m, lqformer in self.lqformers.items():
                present = batch.get("has_audio") if m == "audio" else None
                out = lqformer(batch[m].float(), batch[f"{m}_caption_ids"], batch[f"{m}_caption_mask"],
                               output_attentions, present=present)
                tokens[m], outputs[m] = getattr(self, f"{m}_proj")(out.last_hidden_state).to(dtype), out
        return tokens, outputs

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings (B, L, E) with the modality tokens at the placeholder runs."""
        embeds = self.llm.get_input_embeddings()(batch["input_ids"])
        tokens, _ = self.modality_tokens(batch)
        for m, values in tokens.items():
            where = batch["input_ids"] == self.placeholder_ids[m]  # (B, L)
            counts = where.sum(1)
            if not (counts == values.shape[1]).all():
                raise ValueError(f"each sample needs exactly {values.shape[1]} {m} placeholder tokens, "
                                 f"found {counts.tolist()}")
            embeds = embeds.masked_scatter(where[..., None], values)  # row-major: query order kept
        return embeds

    def forward(self, batch: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None):
        """Causal-LM output; ``loss`` over the target tokens when ``batch`` has ``labels``: their mean,
        or their sum divided by ``num_items_in_batch`` when given (the target tokens of a whole
        optimizer step, all micro-batches and ranks, so each token weighs the same)."""
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        with self.autocast():
            return self.llm(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"],
                            labels=batch.get("labels"), **extra)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], generation_config, **kwargs) -> torch.Tensor:
        """Generated token ids (B, new tokens) after the prompts in ``batch`` (left-padded), under
        ``generation_config`` (a transformers GenerationConfig, see xmei.generate); ``kwargs`` go to
        the LLM's generate (e.g. the label constraint's ``prefix_allowed_tokens_fn``)."""
        with self.autocast():
            return self.llm.generate(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"],
                                     generation_config=generation_config, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for m in self.settings.modalities for name in (f"{m}_lqformer", f"{m}_proj")}

    def prompt_builder(self) -> PromptBuilder:
        return self.settings.prompt_builder(self.tokenizer)

    def save_checkpoint(self, folder: str | Path, config: dict | None = None) -> None:
        """Write the checkpoint folder; ``config`` (the resolved run config) goes to config.yaml."""
        import yaml
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for name, module in self.trainable_modules().items() for k, v in module.state_dict().items()}
        save_file(weights, folder / CHECKPOINT_FILES["trainable"])
        if hasattr(self.llm, "peft_config"):
            # the rows added for the placeholders are rebuilt (zeros) on loading: never the whole table
            self.llm.save_pretrained(folder / CHECKPOINT_FILES["adapter"], save_embedding_layers=False)
        elif not self.settings.model.frozen_llm:  # the whole LLM trained
            self.llm.save_pretrained(folder / CHECKPOINT_FILES["llm"])
            self.tokenizer.save_pretrained(folder / CHECKPOINT_FILES["llm"])
        (folder / CHECKPOINT_FILES["settings"]).write_text(json.dumps(self.settings.to_json(), indent=1) + "\n")
        if config is not None:
            (folder / CHECKPOINT_FILES["config"]).write_text(yaml.safe_dump(config, sort_keys=False))

    @classmethod
    def from_checkpoint(cls, folder: str | Path, llm: str | None = None, trainable: bool = False,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "XMEIQwen":
        """Restore a checkpoint onto ``device``, computing in ``dtype``; ``llm`` overrides the base LLM
        folder recorded in it. Every file is checked before it loads (``verify_checkpoint``), and a
        load that still fails names its file: a CheckpointError."""
        from peft import PeftConfig

        folder = Path(folder)
        settings = verify_checkpoint(folder, config=False)
        if llm is not None:
            settings.model.llama_model_path = Path(llm)
        if settings.llm_part == "llm":
            source = folder / CHECKPOINT_FILES["llm"]
        else:
            source = settings.model.llama_model_path
            if source is None or not Path(source).is_dir():
                said = "given" if llm is not None else f"recorded in {folder / CHECKPOINT_FILES['settings']}"
                raise CheckpointError(f"the base LLM folder {source} ({said}) does not exist (moved or deleted?): "
                                      "point at it with --set model.llama_model_path=DIR or --models DIR")
        whole = trainable and settings.llm_part == "llm"  # trained on: fp32 master weights
        with loading(source):
            base = _load_llm(str(source), torch.device(device), torch.float32 if whole else dtype)
            tokenizer = llm_tokenizer(source)
        bare = copy.deepcopy(settings)  # built without an adapter, which loads next
        bare.model.use_lora, bare.model.frozen_llm, bare.model.caption_embeddings_from = False, True, None
        model = cls(bare, base, tokenizer, dtype=dtype)
        model.settings = settings
        if settings.llm_part == "adapter":  # as PeftModel.from_pretrained, the weights checked before they load
            lora_file = folder / CHECKPOINT_FILES["adapter"] / ADAPTER_FILES["config"]
            with loading(lora_file):
                lora = PeftConfig.from_pretrained(str(lora_file.parent))
                lora.inference_mode = not trainable
                lora.base_model_name_or_path = base.name_or_path  # the base LLM where it is now: no warning
                model.llm = _peft_model(base, lora)
            model.load_adapter(folder)  # onto the base model's device
            if not trainable:
                model.llm.eval()
        elif settings.llm_part == "llm":
            model.llm.requires_grad_(trainable)
        model.trainable_in_fp32()
        model.load_trainable(folder)
        return model

    def load_trainable(self, folder: str | Path) -> None:
        """Load the LQ-Formers and projections of a checkpoint folder (:func:`load_weights`)."""
        load_weights(folder, self.trainable_modules())

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The LoRA adapter's tensors as a checkpoint holds them (peft's names, no embedding rows)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.llm, save_embedding_layers=False)
        return {k: tuple(v.shape) for k, v in state.items()}

    def load_adapter(self, folder: str | Path) -> None:
        """Load a checkpoint folder's LoRA adapter weights into this model's adapter, their names
        and shapes checked first (peft itself only warns about missing ones)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = Path(folder) / CHECKPOINT_FILES["adapter"] / ADAPTER_FILES["weights"]
        check_tensors(file, check_safetensors(file), self.adapter_shapes())
        with loading(file):
            set_peft_model_state_dict(self.llm, load_file(file))

    def load_llm(self, folder: str | Path) -> None:
        """Load a checkpoint folder's whole trained LLM (``llm/``, as :meth:`save_checkpoint` wrote
        it) into this model's LLM in place, a tensor at a time: an optimizer already holding its
        parameters keeps them, and no second copy of the weights is made. The names and shapes are
        checked first; a weight tied to another (an lm_head that is the embedding table) is saved
        once and loads with it."""
        from safetensors import safe_open

        llm = Path(folder) / CHECKPOINT_FILES["llm"]
        shards = {shard: check_safetensors(shard) for shard in llm_shards(llm)}
        found = {name: shape for shapes in shards.values() for name, shape in shapes.items()}
        state = self.llm.state_dict()
        tied: dict[int, list[str]] = {}  # storage -> the names of the weights that share it
        for name, tensor in state.items():
            tied.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
        expected = {name: tuple(state[name].shape) for names in tied.values()
                    for name in [n for n in names if n in found] or names}
        check_tensors(llm, found, expected)
        for shard, shapes in shards.items():
            with loading(shard), safe_open(str(shard), "pt") as weights, torch.no_grad():
                for name in shapes:
                    state[name].copy_(weights.get_tensor(name))
