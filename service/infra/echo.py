"""How an answer repeats what a client sent: a short prefix only, so an error never hands back a long value
(a 10 KB account id, a field name) that a log, a proxy or the client then has to carry."""

from __future__ import annotations

MOST = 40  # characters of a client's value an answer repeats


def clipped(text: str, most: int = MOST) -> str:
    """`text`, or its first `most` characters and an ellipsis."""
    return text if len(text) <= most else text[:most] + "…"


def quoted(value: object) -> str:
    """A client's value as an error repeats it: quoted, its first MOST characters at most."""
    return repr(clipped(str(value)))
