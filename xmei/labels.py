"""Label sets and label normalization, shared by both stages.

The order of a label set is the order of the config: class index i is ``labels[i]``
everywhere (stores, metrics, confusion matrices). It never comes from a ``set()``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DEFAULT_EMOTIONS", "DEFAULT_INTENTS", "DEFAULT_SYNONYMS", "LabelSet", "normalize_text"]

# MC-EIU, whose 7 emotions / 9 intents match the published counts, in its order.
DEFAULT_EMOTIONS = ("happy", "surprise", "sad", "disgust", "anger", "fear", "neutral")
DEFAULT_INTENTS = (
    "questioning", "agreeing", "acknowledging", "encouraging", "consoling",
    "suggesting", "wishing", "sympathizing", "neutral",
)
# Spelling variants seen in annotations and in generated answers -> canonical label.
DEFAULT_SYNONYMS = {
    "emotion": {
        "happiness": "happy", "joy": "happy", "joyful": "happy", "glad": "happy",
        "surprised": "surprise", "sadness": "sad", "unhappy": "sad",
        "disgusted": "disgust", "angry": "anger", "mad": "anger",
        "fearful": "fear", "afraid": "fear", "scared": "fear", "calm": "neutral",
    },
    "intent": {
        "question": "questioning", "asking": "questioning", "agree": "agreeing",
        "agreement": "agreeing", "acknowledge": "acknowledging", "acknowledgement": "acknowledging",
        "encourage": "encouraging", "encouragement": "encouraging", "console": "consoling",
        "comforting": "consoling", "suggest": "suggesting", "suggestion": "suggesting",
        "wish": "wishing", "sympathize": "sympathizing", "sympathise": "sympathizing",
        "sympathising": "sympathizing", "sympathy": "sympathizing",
    },
}

_SPACES = re.compile(r"[\s_\-]+")


def normalize_text(label: str) -> str:
    """Lower-case, trim, and collapse runs of spaces / underscores / hyphens to one space."""
    return _SPACES.sub(" ", label.strip().lower())


@dataclass(frozen=True)
class LabelSet:
    """One ordered label set (emotions or intents) with its synonym table."""

    kind: str  # "emotion" or "intent": names the annotation field in messages
    labels: tuple[str, ...]
    synonyms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        canon = [normalize_text(x) for x in self.labels]
        if not canon:
            raise ValueError(f"the {self.kind} label set is empty")
        dupes = sorted({x for x in canon if canon.count(x) > 1})
        if dupes:
            raise ValueError(f"the {self.kind} label set repeats {dupes}")
        object.__setattr__(self, "labels", tuple(canon))
        table = {}
        for variant, target in self.synonyms.items():
            if normalize_text(target) not in canon:
                raise ValueError(
                    f"{self.kind} synonym {variant!r} points to {target!r}, "
                    f"which is not in the label set {list(canon)}"
                )
            table[normalize_text(variant)] = normalize_text(target)
        object.__setattr__(self, "synonyms", table)

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, raw: str) -> str | None:
        """The canonical label for ``raw``, or None when it is neither a label nor a synonym."""
        key = normalize_text(raw)
        if key in self.labels:
            return key
        return self.synonyms.get(key)

    def index(self, label: str) -> int:
        """Class index of a canonical label (raises KeyError naming the set otherwise)."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"{label!r} is not a {self.kind} label; known: {list(self.labels)}") from None
