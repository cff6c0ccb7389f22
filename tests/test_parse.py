"""Parsing generated answers into (emotion, intent, explanation)."""
from __future__ import annotations

import pytest

from xmei.config import Config
from xmei.labels import LabelSet
from xmei.parse import Parsed, parse_answer
from xmei.prompt import answer_text

CFG = Config()
EMOTIONS, INTENTS = CFG.emotions, CFG.intents


def parse(text: str) -> Parsed:
    return parse_answer(text, EMOTIONS, INTENTS)


def test_exact_template_round_trips_every_label_pair():
    for emotion in EMOTIONS.labels:
        for intent in INTENTS.labels:
            text = answer_text(emotion, intent, "She raises her voice at the delay.")
            assert parse(text) == Parsed(emotion, intent, "She raises her voice at the delay")


def test_parsed_is_frozen():
    parsed = parse(answer_text("sad", "consoling", "x"))
    with pytest.raises(AttributeError):
        parsed.emotion = "happy"  # type: ignore[misc]


@pytest.mark.parametrize("text", [
    "the user's emotion is ANGER, intent is Questioning. the underlying reason is: he shouts",
    "The user's  emotion is   anger ,  intent is  questioning .  The underlying reason is:   he shouts.",
    "THE USER'S EMOTION IS ANGER, INTENT IS QUESTIONING. THE UNDERLYING REASON IS: he shouts.",
    "The user\u2019s emotion is anger, intent is questioning. The underlying reason is: he shouts.",
    "assistant\nThe user's emotion is anger, intent is questioning. The underlying reason is: he shouts.<|im_end|>",
    "The user's emotion is anger, intent is questioning. The underlying reason is: he shouts<|im_end|>\n<|im_end|>junk",
    "The user's emotion is anger, intent is questioning The underlying reason is: he shouts.",
    "The user's emotion is anger, intent is questioning.\nThe underlying reason is:\nhe shouts.\n",
    "The user's emotion is anger, intent is questioning. The underlying reason is: he shouts",
])
def test_template_tolerates_case_spaces_prefix_end_token_and_missing_period(text):
    assert parse(text) == Parsed("anger", "questioning", "he shouts")


def test_template_labels_with_underscores_or_hyphens_are_normalized():
    labels = LabelSet("emotion", ("very happy", "sad"))
    intents = LabelSet("intent", ("asking", "neutral"))
    parsed = parse_answer("The user's emotion is Very_Happy, intent is asking. The underlying reason is: x.",
                          labels, intents)
    assert (parsed.emotion, parsed.intent) == ("very happy", "asking")


def test_template_synonyms():
    parsed = parse("The user's emotion is angry, intent is sympathising. The underlying reason is: she nods.")
    assert parsed == Parsed("anger", "sympathizing", "she nods")
    parsed = parse("The user's emotion is Joyful, intent is Suggestion. The underlying reason is: x.")
    assert (parsed.emotion, parsed.intent) == ("happy", "suggesting")


def test_template_with_an_unknown_word_gives_none_for_that_field_only():
    parsed = parse("The user's emotion is bored, intent is questioning. The underlying reason is: he yawns.")
    assert parsed == Parsed(None, "questioning", "he yawns")
    parsed = parse("The user's emotion is sad, intent is complaining. The underlying reason is: he sighs.")
    assert parsed == Parsed("sad", None, "he sighs")
    # no guessing from the explanation when the template matched
    parsed = parse("The user's emotion is bored, intent is ranting. The underlying reason is: he is angry.")
    assert parsed == Parsed(None, None, "he is angry")


def test_template_label_of_the_wrong_set_is_none():
    parsed = parse("The user's emotion is questioning, intent is anger. The underlying reason is: x.")
    assert (parsed.emotion, parsed.intent) == (None, None)


@pytest.mark.parametrize("text, emotion, intent", [
    ("Emotion: anger. Intent: questioning.", "anger", "questioning"),
    ("The emotion here is sadness and the intent is consoling", "sad", "consoling"),
    ("The speaker's emotion seems to be fear; the intention appears to be suggesting.", "fear", "suggesting"),
    ("emotion = Surprised, intent = question", "surprise", "questioning"),
    ("The user's emotion is anger, intent is questioning.", "anger", "questioning"),  # no reason part
    ("The emotion is most likely disgust.", "disgust", None),
    ("The user's intent is wishing.", None, "wishing"),
])
def test_fallback_phrases(text, emotion, intent):
    parsed = parse(text)
    assert (parsed.emotion, parsed.intent) == (emotion, intent)
    assert parsed.explanation == text.strip().rstrip(".")


def test_fallback_single_label_word():
    parsed = parse("He is clearly angry about the delay and keeps questioning the clerk.")
    assert (parsed.emotion, parsed.intent) == ("anger", "questioning")
    parsed = parse("assistant\nsympathizing<|im_end|>")
    assert (parsed.emotion, parsed.intent) == (None, "sympathizing")
    assert parsed.explanation == "assistant\nsympathizing"


def test_fallback_words_must_be_whole_words():
    parsed = parse("The madness of a gladiator: unhappiness is not a word here, questionings neither.")
    assert (parsed.emotion, parsed.intent) == (None, None)


def test_fallback_zero_or_several_labels_give_none():
    assert parse("She talks about the weather.") == Parsed(None, None, "She talks about the weather")
    parsed = parse("She is happy but also sad; she is agreeing and encouraging.")
    assert (parsed.emotion, parsed.intent) == (None, None)
    # two spellings of one label are one label
    parsed = parse("She is angry, real anger.")
    assert parsed.emotion == "anger"


def test_fallback_phrases_naming_different_labels_give_none():
    parsed = parse("Emotion: anger. Later the emotion is sadness. She is happy.")
    assert parsed.emotion is None


@pytest.mark.parametrize("text", ["", "   ", "<|im_end|>", "asdf qwer zxcv!!", "12345", "The user's"])
def test_garbage_is_invalid_never_a_default(text):
    parsed = parse(text)
    assert parsed.emotion is None and parsed.intent is None
    assert parsed.emotion != "neutral" and parsed.intent != "neutral"


def test_neutral_belongs_to_a_set_only_through_its_own_phrase():
    parsed = parse("The emotion is neutral.")
    assert (parsed.emotion, parsed.intent) == ("neutral", None)
    parsed = parse("Intent: neutral")
    assert (parsed.emotion, parsed.intent) == (None, "neutral")
    parsed = parse("The emotion is happy and the intent is neutral.")
    assert (parsed.emotion, parsed.intent) == ("happy", "neutral")
    parsed = parse("The emotion is neutral and the intent is questioning.")
    assert (parsed.emotion, parsed.intent) == ("neutral", "questioning")
    # a bare "neutral" names neither set
    parsed = parse("Overall it sounds neutral.")
    assert (parsed.emotion, parsed.intent) == (None, None)
    parsed = parse("She is sad, the tone is neutral.")
    assert (parsed.emotion, parsed.intent) == ("sad", None)
    # the template settles it
    parsed = parse("The user's emotion is neutral, intent is neutral. The underlying reason is: flat voice.")
    assert parsed == Parsed("neutral", "neutral", "flat voice")
    parsed = parse("The user's emotion is happy, intent is neutral. The underlying reason is: x.")
    assert (parsed.emotion, parsed.intent) == ("happy", "neutral")


def test_other_sets_keyword_does_not_leak_into_a_phrase():
    # "emotion ... intent is neutral" must not read as the emotion's phrase
    parsed = parse("Hard to tell the emotion but the intent is neutral.")
    assert (parsed.emotion, parsed.intent) == (None, "neutral")


def test_explanation_extraction():
    text = "The user's emotion is sad, intent is consoling. The underlying reason is: She cries. He hugs her.."
    assert parse(text).explanation == "She cries. He hugs her"
    text = "The user's emotion is sad, intent is consoling. The underlying reason is:  <|im_end|>"
    assert parse(text).explanation == ""
    # template absent: the whole text without the end token
    assert parse("  He cries.<|im_end|>").explanation == "He cries"
    # the reason marker without the full template still delimits the explanation
    parsed = parse("Emotion: sad. The underlying reason is: he cries.<|im_end|>")
    assert parsed == Parsed("sad", None, "he cries")
    # round trip with answer_text
    for explanation in ("plain", "ends with a period.", "  spaced  ", "a. b. c..."):
        expected = explanation.strip().rstrip(".")
        assert parse(answer_text("fear", "wishing", explanation)).explanation == expected


def test_custom_synonyms_from_the_config():
    emotions = LabelSet("emotion", ("pos", "neg", "neutral"), {"positive": "pos", "negative": "neg"})
    intents = LabelSet("intent", ("ask", "tell", "neutral"), {"asking": "ask"})
    parsed = parse_answer("The user's emotion is Positive, intent is asking. The underlying reason is: x",
                          emotions, intents)
    assert (parsed.emotion, parsed.intent) == ("pos", "ask")
    parsed = parse_answer("negative, telling", emotions, intents)
    assert (parsed.emotion, parsed.intent) == ("neg", None)
