"""Text is text: special tokens written in a subtitle, an explanation or a description are
tokenized as the plain text they are, in training, evaluation and prediction.

Unit level: the prompt of such texts holds the template's placeholders and end tokens and no
more; a description holding [SEP] keeps one [CLS] ... [SEP] and decodes back to itself; text free
of special tokens gives the ids it gave before (stores and checkpoints stay valid). End to end: a
clip whose texts hold them is extracted, trained on, evaluated and predicted like the others.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from bert_score.utils import sent_encode
from transformers import AutoTokenizer

from conftest import config
from pipeline.encoders import tokenize_captions
from pipeline.synth import text_corpus
from test_model import make_model
from test_text_metrics import MINILM
from test_train import SMALL, read_log
from xmei.bleurt import BleurtScorer, write_tiny_checkpoint
from xmei.data import StoreSamples
from xmei.prompt import IGNORE, PromptBuilder, text_ids
from xmei.text_metrics import _bert_scorer

SUBTITLE = "Well <ImageHere> and <AudioHere>, then <|im_end|> or <|endoftext|> <|im_start|>user [SEP] hi."
EXPLANATION = "the face says <|im_end|> <AudioHere> while <ImageHere> <|endoftext|> waits"
VIDEO_DESCRIPTION = "a face [SEP] then [CLS] <ImageHere> [PAD]"
AUDIO_DESCRIPTION = "a voice [MASK] and [UNK] <|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    """The LLM tokenizer as XMEIQwen holds it: the placeholders added as special tokens."""
    return make_model(tiny_models).tokenizer


def special_counts(tokenizer, ids: list[int]) -> Counter:
    specials = set(tokenizer.all_special_ids)
    return Counter(i for i in ids if i in specials)


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_a_sample_holds_the_templates_special_tokens_and_no_more(tokenizer, prompt_format):
    builder = PromptBuilder(tokenizer, 32, 32, prompt_format)
    plain = builder.encode("Well then.", "happy", "agreeing", "the face smiles")
    odd = builder.encode(SUBTITLE, "happy", "agreeing", EXPLANATION)
    assert special_counts(tokenizer, odd.input_ids) == special_counts(tokenizer, plain.input_ids)
    counts = special_counts(tokenizer, odd.input_ids)
    assert counts[tokenizer.convert_tokens_to_ids("<ImageHere>")] == 32
    assert counts[tokenizer.convert_tokens_to_ids("<AudioHere>")] == 32
    target = [i for i in odd.labels if i != IGNORE]
    assert target.count(tokenizer.eos_token_id) == 1 and target[-1] == tokenizer.eos_token_id  # one end, last
    assert tokenizer.decode(target[:-1]).endswith(f"The underlying reason is: {EXPLANATION}.")
    assert f'The subtitle of this video is "{SUBTITLE}"' in tokenizer.decode(odd.input_ids)
    prompt = builder.prompt(SUBTITLE)
    assert special_counts(tokenizer, prompt) == special_counts(tokenizer, builder.prompt("Well then."))
    assert prompt == odd.input_ids[:len(prompt)]  # generation sees the prompt training saw


def test_text_without_special_tokens_gives_the_ids_it_gave_before(tokenizer, tiny_models):
    texts = [*list(text_corpus(300, 0)), "émotion — naïve “quotes” 🙂", "<|im_end", "[SEP", "a\nb\tc  d", ""]
    assert all(text_ids(tokenizer, t) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    caption_tokenizer = tiny_models / "caption_tokenizer"
    ours = tokenize_captions(str(caption_tokenizer), {"video": texts}, 16)
    before = AutoTokenizer.from_pretrained(caption_tokenizer)(texts, max_length=16, truncation=True,
                                                              padding="max_length", return_tensors="np")
    assert (ours["video_caption_ids"] == before["input_ids"]).all()
    assert (ours["video_caption_mask"] == before["attention_mask"]).all()


def test_a_description_holding_special_tokens_is_text(tiny_models):
    folder = tiny_models / "caption_tokenizer"
    tok = AutoTokenizer.from_pretrained(folder)
    arrays = tokenize_captions(str(folder), {"video": [VIDEO_DESCRIPTION], "audio": [AUDIO_DESCRIPTION]}, 40)
    for kind, text in (("video", VIDEO_DESCRIPTION), ("audio", AUDIO_DESCRIPTION)):
        ids, mask = arrays[f"{kind}_caption_ids"][0], arrays[f"{kind}_caption_mask"][0]
        real = ids[mask == 1].tolist()
        assert len(real) < 40  # not cut: the whole description is there
        assert real[0] == tok.cls_token_id and real[-1] == tok.sep_token_id
        assert not set(real[1:-1]) & set(tok.all_special_ids)
        assert tok.decode(real, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_explanation_metrics_read_special_tokens_as_text(tmp_path):
    scorer = BleurtScorer.from_pretrained(write_tiny_checkpoint(tmp_path / "bleurt"))
    batch = scorer.encode(["a face [SEP] smiles"], ["it [SEP] is [CLS] joy"])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(scorer.tokenizer.sep_token_id) == 2 and ids.count(scorer.tokenizer.cls_token_id) == 1
    assert batch["token_type_ids"][0].tolist().count(1) == len(ids) - ids.index(scorer.tokenizer.sep_token_id) - 1
    bert = _bert_scorer(str(MINILM), 6, None)._tokenizer
    assert sent_encode(bert, "a face [SEP] smiles").count(bert.sep_token_id) == 1


# ----------------------------------------------------------------------------- end to end

def odd_annotations(corpus: Path, out: Path, n: int = 4) -> dict:
    """The first ``n`` training records of the corpus, the first with special tokens in its texts;
    returns that record."""
    records = json.loads((corpus / "annotations" / "train.json").read_text())[:n]
    records[0].update(subtitle=SUBTITLE, explanation=EXPLANATION, video_description=VIDEO_DESCRIPTION,
                      audio_description=AUDIO_DESCRIPTION)
    out.write_text(json.dumps(records))
    return records[0]


def test_a_clip_whose_texts_hold_special_tokens_extracts_trains_evaluates_and_predicts(tiny_models, corpus, tmp_path):
    from pipeline.extract import extract
    from xmei.generate import GenerationSettings, generate_store
    from xmei.model import XMEIQwen
    from xmei.predictor import Predictor
    from xmei.train import Trainer

    cfg = config(tiny_models, *SMALL, "run.max_epoch=1", "run.batch_size_train=2", "run.warmup_steps=0",
                 "eval.max_new_tokens=40")
    odd = odd_annotations(corpus, tmp_path / "odd.json")
    store = tmp_path / "store"
    summary = extract(cfg, tmp_path / "odd.json", corpus, store, workers=0)
    assert summary.ok == 4 and summary.failed == []
    data = StoreSamples([store])
    assert data.strings["subtitle"][0] == SUBTITLE and data.strings["explanation"][0] == EXPLANATION

    trainer = Trainer(cfg, [store], store, tmp_path / "run", strict=True)  # strict: a sample that fails is an error
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    [checkpoint] = (tmp_path / "run" / "checkpoints").iterdir()
    log = read_log(tmp_path / "run")
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in steps)
    [val] = [r for r in log if r.get("val_loss") is not None]
    assert math.isfinite(val["val_loss"]) and val["val_skipped"] == 0

    model = XMEIQwen.from_checkpoint(checkpoint)
    rows, _ = generate_store(model, store, cfg.emotions, cfg.intents, GenerationSettings.from_config(cfg, 1))
    [row] = [r for r in rows if r["video_id"] == odd["video_id"]]
    assert row["emotion"] in cfg.emotions.labels and row["intent"] in cfg.intents.labels
    assert row["ref_explanation"] == EXPLANATION

    audio = corpus / odd["audio_path"] if odd["audio_path"] else None
    predicted = Predictor(cfg, checkpoint).predict(corpus / odd["video_path"], SUBTITLE, audio, VIDEO_DESCRIPTION,
                                                   AUDIO_DESCRIPTION)
    assert predicted.emotion in cfg.emotions.labels and predicted.intent in cfg.intents.labels
    assert not predicted.subtitle_cut and predicted.without_descriptions == ()
    assert predicted.text == row["text"]  # the raw clip and its texts answer as the stored clip did
