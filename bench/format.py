"""Number formatting and plain-text tables shared by every benchmark's report (terminal and README)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to two places, or None when either is missing (a figure not measured is not a zero)."""
    return round(a / b, 2) if a is not None and b else None


def get(results: dict[str, Any], *path: str) -> dict[str, Any]:
    """The dict at `path` in nested results, or {} when any step is missing."""
    node: Any = results
    for key in path:
        node = (node or {}).get(key) if isinstance(node, dict) else None
    return node or {}


def fmt(value: Any, unit: str = "") -> str:
    """A figure as the reports show it: thousands separated, 3 significant-ish digits, "—" when missing."""
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer() and abs(value) < 100_000:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value:,}"
    if isinstance(value, float):
        value = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{value}{unit}"


def percent(share: float | None) -> str:
    """A share (0.88) as a whole percentage ("88%"), "—" when missing."""
    return "—" if share is None else f"{round(100 * share)}%"


def met(flag: bool | None) -> str:
    return "met" if flag else "**not met**"


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    return text


def profile_lines(prof: dict[str, Any]) -> list[str]:
    """A profile summary's shares by stage and by library, one line each, for a terminal table's footer."""
    if prof.get("by_stage"):
        return ["profile by stage: " + "; ".join(f"{label} {pct}%" for label, pct in prof["by_stage"]),
                "profile by library: " + "; ".join(f"{label} {pct}%" for label, pct in prof["by_library"])]
    return [f"profile: {prof['error'].strip()[:200]}"] if prof.get("error") else []
