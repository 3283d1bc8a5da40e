"""Generic wordings of class names for the embeddings tier's discrete prompt search.

A class-per-folder data set names its classes by its folders ("ankle_boot", "sea-lion",
"T-shirt/top"): spellings a text encoder may have seen rarely. Each name gets a few variants
made by rules that know nothing of any data set: separators ('_', '-') as spaces, 'X/Y' as
'X or Y' and as its first alternative 'X', lower case. The search pays for each distinct text
it embeds and weighs the wordings on the training shots like the templates
(client/feature_methods.py `search_templates`); a name with no variant costs nothing extra.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["DEFAULT_WORDINGS", "name_wordings", "wording_slots"]

DEFAULT_WORDINGS = 4  # per class, the name as given included
_SPACES = re.compile(r"\s+")
_UNDERSCORES = re.compile(r"_+")
_HYPHENS = re.compile(r"(?<=\w)-(?=\w)")
_SLASH = re.compile(r"\s*/\s*")


def _tidy(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def name_wordings(name: str, limit: int = DEFAULT_WORDINGS) -> list[str]:
    """The name as given first, then up to `limit - 1` distinct generic variants of it."""
    spaced = _tidy(_UNDERSCORES.sub(" ", name))  # "ankle_boot" -> "ankle boot"
    parts = [p for p in (_tidy(a) for a in _SLASH.split(spaced)) if p]
    candidates = [
        name,
        " or ".join(parts),  # "T-shirt/top" -> "T-shirt or top"
        parts[0] if parts else spaced,  # -> "T-shirt"
        spaced,
        _tidy(_HYPHENS.sub(" ", spaced)),  # "sea-lion" -> "sea lion"
    ]
    candidates += [c.lower() for c in candidates]
    out: list[str] = []
    for candidate in candidates:
        if candidate and candidate not in out:
            out.append(candidate)
    return out[: max(1, limit)]


def wording_slots(class_names: Sequence[str], limit: int = DEFAULT_WORDINGS) -> list[list[str]]:
    """[J][C]: slot j names every class by its j-th wording, or by its name as given when it has
    fewer (slot 0 is the names as given). J is the most wordings any class has."""
    per_class = [name_wordings(name, limit) for name in class_names]
    slots = max((len(w) for w in per_class), default=1)
    return [[w[j] if j < len(w) else w[0] for w in per_class] for j in range(slots)]
