"""Words around numbers in what a person reads: `counted(1, "repeat")` is "1 repeat",
`counted(6, "repeat")` "6 repeats" (never "1 repeats")."""

from __future__ import annotations

import difflib


def counted(n, word: str, plural: str | None = None) -> str:
    """`n` and `word` in the number `n` asks for; `plural` where adding "s" is wrong."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'epochs'?)' for the closest of `choices` to a misspelled `word`, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
