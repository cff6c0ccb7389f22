"""Parse a generated answer into (emotion, intent, explanation).

The model is trained to answer with ``xmei.prompt.ANSWER``:

    The user's emotion is {emotion}, intent is {intent}. The underlying reason is: {explanation}.

Rules, in order, for each of the two label sets:

1. The template (case, extra spaces, a missing final period, text before it such as
   ``"assistant\\n"`` and an end token such as ``<|im_end|>`` after it are tolerated). When it
   matches, the captured words go through :meth:`LabelSet.normalize` and that is the answer: an
   unknown word gives None, with no further guessing.
2. Otherwise, "emotion ... is X" / "intent ... is Y" style phrases (``is``, ``was``, ``are``,
   ``seems to be``, ``appears to be``, ``:``, ``=``), where X is a label or synonym of that set.
   Several phrases naming different labels give None.
3. Otherwise, exactly one label (or synonym) of the set present as a whole word. Words known to
   both sets (``neutral``) are skipped here: a set takes such a word only from its own phrase.

Anything else is None ("invalid"): nothing is ever mapped to a default label.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from xmei.labels import LabelSet

__all__ = ["END_TOKENS", "Parsed", "parse_answer"]

# Everything from the first of these on is dropped (Qwen chat end, Qwen text end, Llama-style end).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>")

_APOSTROPHE = r"['\u2019`]"
_TEMPLATE = re.compile(
    r"the\s+user\s*(?:" + _APOSTROPHE + r"\s*)?s\s+emotion\s+is\s+(?P<emotion>[^,.;\n]*?)\s*[,;]\s*"
    r"(?:and\s+)?(?:the\s+)?(?:user\s*(?:" + _APOSTROPHE + r"\s*)?s\s+)?intent\s+is\s+(?P<intent>[^,.;\n]*?)"
    r"\s*[.,;]?\s*the\s+underlying\s+reason\s+is\s*:?(?P<explanation>.*)",
    re.IGNORECASE | re.DOTALL,
)
_REASON = re.compile(r"the\s+underlying\s+reason\s+is\s*:?", re.IGNORECASE)
# Keywords that open a phrase naming the label of a set, by LabelSet.kind.
_KEYWORDS = {"emotion": r"emotions?|emotional\s+states?", "intent": r"intents?|intentions?"}
_VERB = r"(?:\bis\b|\bwas\b|\bare\b|\bseems?(?:\s+to\s+be)?\b|\bappears?(?:\s+to\s+be)?\b|:|=)"
_FILLER = (r"(?:(?:a|an|the|of|likely|probably|most\s+likely|mostly|mainly|clearly|primarily|"
           r"predominantly|best\s+described\s+as|classified\s+as|labell?ed\s+as)\s+)*")


@dataclass(frozen=True)
class Parsed:
    """One parsed answer: canonical labels (None = invalid) and the explanation text."""

    emotion: str | None
    intent: str | None
    explanation: str


def _strip_end(text: str) -> str:
    cut = len(text)
    for token in END_TOKENS:
        at = text.find(token)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def _clean_explanation(text: str) -> str:
    return text.strip().rstrip(".").strip()


def _surface_forms(labels: LabelSet) -> dict[str, str]:
    """Every normalized surface form (label or synonym) -> its canonical label."""
    forms = dict(labels.synonyms)
    forms.update({label: label for label in labels.labels})
    return forms


def _alternation(forms) -> str:
    """A regex matching any of the normalized forms as whole words (longest first)."""
    parts = []
    for form in sorted(forms, key=lambda f: (-len(f), f)):
        words = [re.escape(w) for w in form.split(" ") if w]
        if words:
            parts.append(r"[\s_\-]+".join(words))
    return r"(?<![\w])(?:" + "|".join(parts) + r")(?![\w])"


def _keyword(kind: str) -> str:
    return _KEYWORDS.get(kind, re.escape(kind) + "s?")


def _from_phrases(text: str, labels: LabelSet, other: LabelSet) -> tuple[bool, str | None]:
    """(found any phrase, its label): the label is None when phrases name different labels."""
    forms = _surface_forms(labels)
    if not forms:
        return False, None
    # Between the keyword and the verb: a few words, no punctuation, and not the other set's keyword.
    guard = r"(?:(?!\b(?:" + _keyword(other.kind) + r")\b)[^.,;:!?\n=]){0,60}?"
    pattern = re.compile(
        r"\b(?:" + _keyword(labels.kind) + r")\b" + guard + _VERB + r"\s*" + _FILLER
        + r"(?P<label>" + _alternation(forms) + r")",
        re.IGNORECASE,
    )
    found = {labels.normalize(m.group("label")) for m in pattern.finditer(text)}
    found.discard(None)
    if not found:
        return False, None
    return True, (found.pop() if len(found) == 1 else None)


def _from_words(text: str, labels: LabelSet, other: LabelSet) -> str | None:
    """The single label of ``labels`` named as a whole word, ignoring words the other set knows."""
    forms = {f: c for f, c in _surface_forms(labels).items() if other.normalize(f) is None}
    if not forms:
        return None
    found = {labels.normalize(m.group(0)) for m in re.finditer(_alternation(forms), text, re.IGNORECASE)}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def _fallback(text: str, labels: LabelSet, other: LabelSet) -> str | None:
    phrased, label = _from_phrases(text, labels, other)
    if phrased:
        return label
    return _from_words(text, labels, other)


def parse_answer(text: str, emotions: LabelSet, intents: LabelSet) -> Parsed:
    """Parse one generated answer; see the module docstring for the rules."""
    body = _strip_end(text or "")
    match = _TEMPLATE.search(body)
    if match:
        return Parsed(
            emotion=emotions.normalize(match.group("emotion")),
            intent=intents.normalize(match.group("intent")),
            explanation=_clean_explanation(match.group("explanation")),
        )
    reason = _REASON.search(body)
    explanation = body[reason.end():] if reason else body
    return Parsed(
        emotion=_fallback(body, emotions, intents),
        intent=_fallback(body, intents, emotions),
        explanation=_clean_explanation(explanation),
    )
