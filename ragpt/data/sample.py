"""The shipped sample corpus: a fictional company's documents for hr, it and finance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "sample_corpus"
SAMPLE_DEPARTMENTS = ("hr", "it", "finance")


@dataclass(frozen=True)
class SampleQuestion:
    department: str
    question: str
    answers: list[str]
    source: str  # relative to SAMPLE_DIR, e.g. "hr/vacation-policy.txt"


def department_dir(department: str) -> Path:
    return SAMPLE_DIR / department


def sample_questions(department: str | None = None) -> list[SampleQuestion]:
    out = []
    for line in (SAMPLE_DIR / "questions.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = SampleQuestion(**json.loads(line))
            if department is None or q.department == department:
                out.append(q)
    return out
