"""Label probabilities (xmei.probabilities) on the briefly trained tiny model, and what eval and
score make of them: top-2 accuracy, the expected calibration error and the reliability diagram.

The scoring pass is checked against a brute force that shares none of its code: each answer
head run alone through the LLM's plain forward, its tokens' probabilities renormalized along the
trie. Beside the default labels (each set parted at one token on the tiny tokenizer), a label set
whose labels share their first token ("happy" / "happyish") parts at a later branch point.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import LAST
from test_eval import xmei
from xmei.config import Config
from xmei.constrain import LabelConstraint, answer_head
from xmei.prompt import text_ids

LABELS = Config()
# on the tiny tokenizer " happyish" is " happy" + "is" + "h" and " agreeingly" is " agreeing" + "ly": these
# emotions part from each other after their first token, and so do these intents
SHARED = (("happy", "happyish", "sad", "sadly"), ("agreeing", "agreeingly", "neutral"))


@pytest.fixture(scope="module")
def model(trained_run):
    from xmei.model import XMEIQwen

    return XMEIQwen.from_checkpoint(trained_run / LAST).eval()


@pytest.fixture(scope="module")
def samples(patch_store) -> list[dict]:
    from xmei.data import StoreSamples

    return StoreSamples([patch_store]).__getitems__(list(range(8)))


@pytest.fixture(scope="module")
def rows(model, patch_store) -> list[dict]:
    """Every clip of the store, decoded greedily under the label constraint."""
    from xmei.generate import GenerationSettings, generate_store

    settings = GenerationSettings(max_new_tokens=17, batch_size=8)  # the longest head is 16 tokens
    return generate_store(model, patch_store, LABELS.emotions, LABELS.intents, settings)[0]


def batch_of(model, samples: list[dict]) -> dict[str, torch.Tensor]:
    from xmei.generate import prompt_batch

    return prompt_batch(model, samples, model.prompt_builder())


@torch.no_grad()
def brute_force(model, sample: dict, constraint: LabelConstraint) -> torch.Tensor:
    """log P(head) (E, I): every head teacher-forced after the clip's prompt (no padding before it),
    each in a row of its own through the LLM's plain forward, each token's log-probability
    renormalized over the tokens the trie allows there."""
    embeds = model.embed(batch_of(model, [sample]))  # (1, L, E)
    heads = list(constraint.heads)
    ids = torch.tensor([list(h) + [0] * (constraint.depth - len(h)) for h in heads])  # (H, depth): padded after
    x = torch.cat([embeds.expand(len(heads), -1, -1), model.llm.get_input_embeddings()(ids)], 1)
    logits = model.llm(inputs_embeds=x).logits[:, embeds.shape[1] - 1:-1].float()  # (H, depth, V)
    out = torch.full((len(constraint.emotions), len(constraint.intents)), float("nan"))
    for row, head in enumerate(heads):
        emotion, intent = constraint.heads[head]
        out[constraint.emotions.index(emotion), constraint.intents.index(intent)] = sum(
            logits[row, t, token] - logits[row, t, constraint.allowed(head[:t])].logsumexp(0)
            for t, token in enumerate(head))
    return out


def test_each_distribution_sums_to_one_and_its_top_label_is_the_greedy_answer(rows):
    assert len(rows) == 24
    for row in rows:
        for kind, labels in (("emotion", LABELS.emotions.labels), ("intent", LABELS.intents.labels)):
            probs = row[f"{kind}_probs"]
            assert list(probs) == list(labels) and all(0 <= p <= 1 for p in probs.values())
            assert abs(sum(probs.values()) - 1) < 1e-5
            # greedy under the constraint picks the most probable token at each branch point; the default
            # labels part at one token each on the tiny tokenizer, so that token is the top label
            assert max(probs, key=probs.get) == row[kind], (row["video_id"], kind, probs)
    tops = {round(max(r["emotion_probs"].values()), 4) for r in rows}
    assert len(tops) > 5  # the distributions are the clips' own, not one shared


@pytest.mark.parametrize("labels", [(LABELS.emotions.labels, LABELS.intents.labels), SHARED],
                         ids=["default labels", "labels parting after their first token"])
def test_probabilities_equal_a_brute_force_scoring_of_every_head(model, samples, labels):
    from xmei.probabilities import head_log_probs, label_probabilities

    constraint = LabelConstraint(model.tokenizer, *labels)
    clips = [samples[0], samples[3], samples[5]]
    batch = batch_of(model, clips)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # prompts of other lengths: left padding
    expected = torch.stack([brute_force(model, s, constraint) for s in clips])  # (3, E, I)
    torch.testing.assert_close(head_log_probs(model, batch, constraint), expected, atol=1e-4, rtol=0)

    emotions, intents = constraint.emotions, constraint.intents
    context = [emotions[-1], None, emotions[1]]  # None: an answer off the trie, in the most probable emotion's context
    heads = [text_ids(model.tokenizer, answer_head(e, intents[0])) if e else [0, 1, 2] for e in context]
    generated = torch.tensor([h + [model.tokenizer.pad_token_id] * (20 - len(h)) for h in heads])
    for row, (got_emotions, got_intents) in enumerate(label_probabilities(model, batch, generated, constraint)):
        joint = expected[row].exp()  # (E, I)
        emotion = joint.sum(1)
        e = emotions.index(context[row]) if context[row] else int(emotion.argmax())
        assert list(got_emotions) == list(emotions) and list(got_intents) == list(intents)
        np.testing.assert_allclose(list(got_emotions.values()), emotion.tolist(), atol=1e-4)
        np.testing.assert_allclose(list(got_intents.values()), (joint[e] / emotion[e]).tolist(), atol=1e-4)


def test_where_an_answer_settles_its_emotion(model):
    constraint = LabelConstraint(model.tokenizer, *SHARED)

    def ids(text: str) -> list[int]:
        return text_ids(model.tokenizer, text)

    assert constraint.emotion_of(ids(answer_head("happyish", "neutral"))) == "happyish"
    assert constraint.emotion_of(ids(answer_head("happy", "agreeing") + " because")) == "happy"
    assert constraint.emotion_of(ids("The user's emotion is happy")) is None  # happy or happyish: not yet settled
    assert constraint.emotion_of(ids("The user's emotion is joyful, intent is")) is None  # off the trie
    branches = constraint.branches
    assert len(branches.paths) == 4 and int(branches.valid.sum()) == branches.incidence.shape[1]
    assert branches.incidence.shape[0] == 4 * 3 and (branches.incidence.sum(1) >= 2).all()


def test_a_batch_gives_each_clip_what_it_gets_alone(model, samples):
    from xmei.generate import GenerationSettings, answer

    settings = GenerationSettings(max_new_tokens=17)
    together = answer(model, batch_of(model, samples), settings)
    for sample, one in zip(samples, together):
        alone = answer(model, batch_of(model, [sample]), settings)[0]
        assert alone.text == one.text
        for kind in ("emotion_probs", "intent_probs"):
            np.testing.assert_allclose(list(getattr(alone, kind).values()), list(getattr(one, kind).values()),
                                       atol=1e-5)


def test_free_decoding_and_beam_search_carry_the_probabilities_of_their_answers(model, samples):
    from xmei.generate import GenerationSettings, answer
    from xmei.probabilities import head_log_probs

    batch = batch_of(model, samples)
    joint = head_log_probs(model, batch, LabelConstraint(model.tokenizer, LABELS.emotions.labels,
                                                         LABELS.intents.labels)).exp()  # (8, E, I)
    greedy = answer(model, batch, GenerationSettings(max_new_tokens=17))
    free = answer(model, batch, GenerationSettings(max_new_tokens=17, constrained=False))
    beams = answer(model, batch, GenerationSettings(max_new_tokens=17, num_beams=3))
    emotions = LABELS.emotions.labels
    for row, (g, f, b) in enumerate(zip(greedy, free, beams)):
        for one in (f, b):  # P(emotion) does not depend on the answer
            np.testing.assert_allclose(list(one.emotion_probs.values()), list(g.emotion_probs.values()), atol=1e-5)
        for one in (f, b):  # P(intent) is in the context of the answer's own emotion (else the most probable)
            said = [e for e in emotions if one.text.startswith(f"The user's emotion is {e},")]
            e = emotions.index(said[0]) if said else int(joint[row].sum(1).argmax())
            np.testing.assert_allclose(list(one.intent_probs.values()), (joint[row, e] / joint[row, e].sum()).tolist(),
                                       atol=1e-5)


def test_in_bf16_the_probabilities_stay_those_of_fp32(trained_run, model, samples):
    from xmei.generate import GenerationSettings, answer
    from xmei.model import XMEIQwen

    bf16 = XMEIQwen.from_checkpoint(trained_run / LAST, dtype=torch.bfloat16).eval()  # its autocast, as on a GPU
    batch, settings = batch_of(model, samples), GenerationSettings(max_new_tokens=17)
    for low, full in zip(answer(bf16, batch, settings), answer(model, batch, settings)):
        for kind in ("emotion_probs", "intent_probs"):
            got, expected = getattr(low, kind), getattr(full, kind)
            assert abs(sum(got.values()) - 1) < 1e-5  # renormalized in fp32
            # measured: at most 8.4e-4 apart on these 8 clips
            np.testing.assert_allclose(list(got.values()), list(expected.values()), atol=1e-2)


def probability_rows(count: int = 3) -> list[dict]:
    e, i = LABELS.emotions.labels, LABELS.intents.labels
    return [{"video_id": f"v{n}", "text": "", "cut_off": False, "emotion": "happy", "intent": "agreeing",
             "explanation": "the face", "ref_emotion": "happy", "ref_intent": "agreeing", "ref_explanation": "the face",
             "emotion_probs": {label: 1 / len(e) for label in reversed(e)},
             "intent_probs": {label: 1.0 if label == "agreeing" else 0.0 for label in i}} for n in range(count)]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(emotion_probs=[0.5, 0.5]), "emotion_probs is a JSON array, expected an object"),
    (lambda r: r["emotion_probs"].pop("fear"), "emotion_probs must hold exactly the config's emotion labels"),
    (lambda r: r["intent_probs"].update(joy=0.0), "not labels ['joy']"),
    (lambda r: r["intent_probs"].update(agreeing=1.5, neutral=-0.5), "intent_probs['agreeing'] is 1.5, expected a "
                                                                     "number in [0, 1]"),
    (lambda r: r["intent_probs"].update(agreeing="1"), "intent_probs['agreeing'] is \"1\""),
    (lambda r: r["intent_probs"].update(agreeing=0.99), "intent_probs sums to 0.99, expected 1"),
    (lambda r: r.update(free={"text": "", "emotion": None, "intent": None, "explanation": None,
                              "emotion_probs": {"happy": 1.0}}), "free: emotion_probs must hold exactly"),
], ids=["not an object", "a label missing", "not a label", "out of [0, 1]", "a string", "sum", "in the free answer"])
def test_a_predictions_file_with_bad_probabilities_is_an_error_naming_line_and_field(tmp_path, change, message):
    from xmei.evaluate import EvaluationError, read_predictions

    rows = probability_rows()
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_predictions(path, LABELS.emotions, LABELS.intents)
    assert list(read[0]["emotion_probs"]) == list(LABELS.emotions.labels)  # back in label order
    change(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvaluationError, match="line 2") as caught:
        read_predictions(path, LABELS.emotions, LABELS.intents)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_top2_accuracy_and_ece_against_a_hand_computation():
    from xmei.classification import calibration

    labels = ("a", "b", "c")
    probs = [{"a": 0.95, "b": 0.03, "c": 0.02},  # top a, reference a: right, confidence 0.95 (bin 9)
             {"a": 0.50, "b": 0.40, "c": 0.10},  # top a, reference b: wrong, b second: a top-2 hit (bin 5)
             {"a": 0.20, "b": 0.25, "c": 0.55},  # top c, reference a: wrong, a third: a top-2 miss (bin 5)
             {"a": 0.30, "b": 0.35, "c": 0.35},  # tie b / c: b first (label order), reference c: top-2 hit (bin 3)
             {"a": 1.00, "b": 0.00, "c": 0.00}]  # confidence 1 falls in the last bin (bin 9), right
    report = calibration(["a", "b", "a", "c", "a"], probs, labels)
    assert report["top2_accuracy"] == pytest.approx(4 / 5)
    # bin 9: accuracy 1, confidence 0.975; bin 5: accuracy 0, confidence 0.525; bin 3: accuracy 0, confidence 0.35
    assert report["ece"] == pytest.approx(2 / 5 * 0.025 + 2 / 5 * 0.525 + 1 / 5 * 0.35)
    assert [b["count"] for b in report["bins"]] == [0, 0, 0, 1, 0, 2, 0, 0, 0, 2]
    assert report["bins"][5] == {"low": 0.5, "high": 0.6, "count": 2, "accuracy": 0.0,
                                 "confidence": pytest.approx(0.525)}
    with pytest.raises(ValueError, match="expected"):
        calibration(["a"], [{"a": 1.0}], labels)


def test_eval_outputs_carry_top2_ece_and_the_reliability_diagrams_only_with_probabilities(tmp_path, monkeypatch):
    import matplotlib.image

    from xmei import evaluate
    from xmei.classification import calibration
    from xmei.evaluate import NO_PROBABILITIES, score, write_report

    # the explanation metrics (seconds of METEOR's Java a call) are test_eval's: not scored here
    monkeypatch.setattr(evaluate, "explanation_metrics", lambda refs, hyps, cfg: {
        name: {"unavailable": "not scored in this test"} for name in evaluate.PUBLISHED_ORDER})

    rows = probability_rows(4)
    rows[3].update(ref_emotion="sad", emotion_probs={**{k: 0.0 for k in LABELS.emotions.labels}, "happy": 0.8,
                                                     "sad": 0.2})
    results = score(rows, LABELS.emotions, LABELS.intents, LABELS.eval)
    emotion = results["emotion"]["calibration"]
    assert emotion == calibration([r["ref_emotion"] for r in rows], [r["emotion_probs"] for r in rows],
                                  LABELS.emotions.labels)
    assert emotion["top2_accuracy"] == 1.0 and 0 < emotion["ece"] < 1  # uniform: first-listed happy is the top
    assert results["intent"]["calibration"]["ece"] == 0.0 and results["intent"]["calibration"]["top2_accuracy"] == 1
    write_report(results, tmp_path / "with", LABELS.emotions, LABELS.intents, "t")
    for kind in ("emotion", "intent"):
        image = matplotlib.image.imread(tmp_path / "with" / f"reliability_{kind}.png")
        assert image.shape[0] > 300 and np.ptp(image[..., :3]) > 0
    report = (tmp_path / "with" / "report.md").read_text()
    assert f"| emotion | 1.0000 | {emotion['ece']:.4f} |" in report and "(reliability_intent.png)" in report

    plain = [{k: v for k, v in r.items() if not k.endswith("_probs")} for r in rows]
    results = score(plain, LABELS.emotions, LABELS.intents, LABELS.eval)  # a baseline's rows
    write_report(results, tmp_path / "without", LABELS.emotions, LABELS.intents, "t")
    assert not list((tmp_path / "without").glob("reliability_*.png"))
    saved = json.loads((tmp_path / "without" / "results.json").read_text())
    assert saved["emotion"]["calibration"] == saved["intent"]["calibration"] == {"unavailable": NO_PROBABILITIES}
    assert f"Top-2 accuracy and ECE unavailable: {NO_PROBABILITIES}." in (tmp_path / "without" / "report.md").read_text()
    for row in rows[2:]:  # some rows without intent probabilities: no intent figures, the emotion's kept
        del row["intent_probs"]
    results = score(rows, LABELS.emotions, LABELS.intents, LABELS.eval)
    assert results["emotion"]["calibration"] == emotion
    write_report(results, tmp_path / "some", LABELS.emotions, LABELS.intents, "t")
    assert [f.name for f in (tmp_path / "some").glob("reliability_*.png")] == ["reliability_emotion.png"]
    assert "| intent | unavailable: 2 of 4 predictions carry no label probabilities |" in \
        (tmp_path / "some" / "report.md").read_text()


def test_predict_prints_the_probabilities_of_one_clip(trained_run, corpus):
    args = (corpus / "videos" / "synth_00000.mp4", "--subtitle", "Well.", "--checkpoint", trained_run / LAST)
    out = json.loads(xmei("predict", *args, "--json").stdout)
    for kind, labels in (("emotion", LABELS.emotions.labels), ("intent", LABELS.intents.labels)):
        probs = out[f"{kind}_probs"]
        assert list(probs) == list(labels) and math.isclose(sum(probs.values()), 1, abs_tol=1e-5)
        assert max(probs, key=probs.get) == out[kind]
    shown = xmei("predict", *args).stdout
    top = max(out["emotion_probs"].values())
    assert f"emotion: {out['emotion']}  ({out['emotion']} {top:.2f}, " in shown
