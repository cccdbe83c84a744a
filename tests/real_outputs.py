"""Access to the verbatim model outputs in tests/fixtures/real_outputs (each keeps its SOURCE)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "real_outputs"


def raw_text(name: str) -> str:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return text.split("-----\n", 1)[1].rsplit("\n-----", 1)[0]


def all_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.txt"))
