"""Markdown tables: medians (with the range over repeats) and ratios against ours."""

from __future__ import annotations

import dataclasses

from bench.harness import OURS, TITLES, Outcome


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]  # fmt: skip
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def number(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def cell(o: Outcome | None, scale: float = 1.0) -> str:
    if o is None:
        return "—"
    if not o.samples:
        return f"n/a ({o.error})" if o.error else "n/a"
    s = [v * scale for v in o.samples]
    med = o.median * scale
    if len(s) == 1:
        return number(med)
    return f"{number(med)} ({number(min(s))}–{number(max(s))})"


def advantage(ours: Outcome | None, other: Outcome | None, higher_is_better: bool) -> str:
    """How many times better ours is (>1: faster, more images/s or less memory)."""
    if not ours or not other or ours.median is None or other.median is None or not ours.median or not other.median:
        return "n/a"
    r = ours.median / other.median if higher_is_better else other.median / ours.median
    return f"{r:.2f}×"


def comparison(title: str, what: str, unit: str, rows: list[tuple[str, dict[str, Outcome]]], contenders,
               higher_is_better=False, scale=1.0, notes=()) -> Table:  # fmt: skip
    """One row per measurement; a column per contender and ``ours vs X`` columns."""
    others = [c for c in contenders if c != OURS]
    header = [what] + [f"{TITLES[c]} [{unit}]" for c in contenders]
    if OURS in contenders:
        header += [f"ours vs {TITLES[c]}" for c in others]
    t = Table(title, header, notes=list(notes))
    for label, out in rows:
        r = [label] + [cell(out.get(c), scale) for c in contenders]
        if OURS in contenders:
            r += [advantage(out.get(OURS), out.get(c), higher_is_better) for c in others]
        t.rows.append(r)
    better = "higher" if higher_is_better else "lower"
    t.notes.append(
        f"Medians, (min–max) over repeats; {better} is better. `ours vs X` is how many times better ours is."
    )
    return t
