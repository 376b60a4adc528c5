"""QA examples: load JSONL `{question, answers, doc_id?, context?, department?, history?}` or SQuAD JSON."""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ragpt.errors import RagptError

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation or articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


@dataclass
class QAExample:
    question: str
    answers: list[str]
    id: str | None = None
    doc_id: str | None = None
    department: str | None = None
    context: str | None = None  # the gold passage, when the data set has one
    history: list[dict] = field(default_factory=list)  # earlier turns: {"role", "content"}
    system: str | None = None  # a client's system text, appended to the department's system turn

    def to_record(self) -> dict:
        """The JSON record (and what its hash covers); `system` only when set, so records and hashes
        of data without system text are what they were before the field existed."""
        rec = asdict(self)
        if rec["system"] is None:
            del rec["system"]
        return rec

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise RagptError(f"QA example {self.id or ''}: empty question")
        if isinstance(self.answers, str):
            self.answers = [self.answers]
        self.answers = [a for a in self.answers if isinstance(a, str) and a.strip()]
        if not self.answers:
            raise RagptError(f"QA example {self.id or self.question[:40]!r}: no answers")


def _from_record(rec: dict, where: str) -> QAExample:
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, list) and answers and isinstance(answers[0], dict):
        answers = [a.get("text", "") for a in answers]
    known = {"question", "id", "doc_id", "department", "context", "history", "system"}
    fields = {k: v for k, v in rec.items() if k in known}
    if "doc_id" not in fields and isinstance(rec.get("source"), str):
        fields["doc_id"] = rec["source"]  # the sample corpus's name for it
    try:
        return QAExample(answers=answers or [], **fields)
    except TypeError as e:
        raise RagptError(f"{where}: bad QA record ({e})") from e


def load_squad(obj: dict, path: Path) -> list[QAExample]:
    out = []
    for article in obj["data"]:
        title = article.get("title")
        for pi, para in enumerate(article.get("paragraphs", [])):
            for qa in para.get("qas", []):
                answers = [a["text"] for a in qa.get("answers", [])]
                if not answers:
                    continue  # SQuAD v2 unanswerables: nothing to train on
                out.append(QAExample(question=qa["question"], answers=answers, id=qa.get("id"),
                                     doc_id=title or f"doc{pi}", context=para.get("context")))
    return out


def load_qa(path: Path) -> list[QAExample]:
    """Read a QA file; raise RagptError naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise RagptError(f"{path}: QA file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise RagptError(f"{path}: QA file is empty")
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RagptError(f"{path}: not valid JSON ({e})") from e
        if isinstance(obj, dict) and "data" in obj:
            examples = load_squad(obj, path)
        elif isinstance(obj, list):
            examples = [_from_record(r, f"{path}[{i}]") for i, r in enumerate(obj)]
        else:
            raise RagptError(f"{path}: expected SQuAD JSON ({{'data': [...]}}) or a list of records")
    else:
        examples = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RagptError(f"{path}:{n}: not valid JSON ({e})") from e
            examples.append(_from_record(rec, f"{path}:{n}"))
    if not examples:
        raise RagptError(f"{path}: no usable QA examples")
    return examples


def save_jsonl(examples: list[QAExample], path: Path) -> None:
    from ragpt.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(e.to_record(), ensure_ascii=False) + "\n" for e in examples))


def examples_sha256(examples: list[QAExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps(e.to_record(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _seeded_order(keys, seed: int) -> list:
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def _by_document(examples: list[QAExample]) -> dict[str, list[QAExample]]:
    groups: dict[str, list[QAExample]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.doc_id or f"__example{i}", []).append(e)
    return groups


def split_by_document(examples: list[QAExample], dev_fraction: float, seed: int,
                      cap: int | None = None) -> tuple[list, list]:
    """Deterministic train/dev split that keeps each document's questions on one side: whole
    documents, in a seeded order, go to dev until it holds dev_fraction of the questions (at most
    `cap`; the last document may overshoot, see spread_sample)."""
    groups = _by_document(examples)
    want = max(1, round(dev_fraction * len(examples))) if dev_fraction > 0 else 0
    if cap is not None:
        want = min(want, cap)
    dev, train = [], []
    for g in _seeded_order(groups, seed):
        (dev if len(dev) < want else train).extend(groups[g])
    return train, dev


def spread_sample(examples: list[QAExample], n: int, seed: int) -> list[QAExample]:
    """At most n examples spread across documents: documents in a seeded order take turns, one
    question each (in a seeded order within the document), so that a dev set cut from a file
    sorted by document is not one or two documents' questions."""
    if len(examples) <= n:
        return list(examples)
    queues = [_seeded_order(range(len(qs)), seed) for qs in _by_document(examples).values()]
    groups = list(_by_document(examples).values())
    order = _seeded_order(range(len(groups)), seed)
    out: list[QAExample] = []
    depth = 0
    while len(out) < n:
        for g in order:
            if depth < len(queues[g]) and len(out) < n:
                out.append(groups[g][queues[g][depth]])
        depth += 1
    return out


def select_dev(qas: list[QAExample], dev_qas: list[QAExample] | None, *, dev_fraction: float, dev_max: int,
               seed: int, rule: str = "spread") -> tuple[list[QAExample], list[QAExample]]:
    """The training and dev questions of a run.

    Without a dev file, whole documents of `qas` (seeded) are held out until dev has dev_fraction
    of the questions, at most dev_max. With one, up to dev_max of its questions, spread across its
    documents. Rule "first" is how prompts trained before spreading picked them (the first
    dev_max), kept so that their training data can still be recognised.
    """
    if rule == "first":
        train, dev = (qas, dev_qas) if dev_qas is not None else split_by_document(qas, dev_fraction, seed)
        return train, dev[:dev_max]
    if dev_qas is None:
        train, dev = split_by_document(qas, dev_fraction, seed, cap=dev_max)
    else:
        train, dev = qas, dev_qas
    return train, spread_sample(dev, dev_max, seed)
