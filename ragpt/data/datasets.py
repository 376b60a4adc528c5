"""Importers for the public QA sets in the shared data folder (settings.data_dir), and the
split-hygiene helpers that evaluation relies on.

Each importer writes a self-contained folder that the ordinary CLI consumes:
    <out>/docs/<department>/<document>.txt      ingest with `ragpt ingest -d <department>`
    <out>/qa/<department>.<split>.jsonl         train / evaluate with `--data`
    <out>/summary.json                          counts, and how the splits were made ("split")
Splits are by *document* (a document's questions all land in one split), deterministic, and
checked when written: an importer fails rather than put one document in two splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ragpt.atomic import atomic_write_text
from ragpt.data.qa import QAExample, examples_sha256, normalize_answer, save_jsonl, select_dev
from ragpt.errors import RagptError

SPLITS = ("train", "dev", "test")
# Where a soft prompt's metadata ("extra") keeps the question keys of its training + dev data.
TRAINING_QUESTIONS_META_KEY = "training_question_sha256"


class SplitLeakError(RagptError):
    """A document or question sits in two splits that must be disjoint."""


# ---------------------------------------------------------------------------- split hygiene


def question_key(question: str, doc_id: str | None) -> str:
    """A short hash of (normalised question, document): equal for the same question about the
    same document, whatever its case, punctuation or articles. The document is part of the key
    because templated sets (PolicyQA) ask the same question about many documents."""
    text = normalize_answer(question) + "\x1f" + (doc_id or "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def question_hashes(qas: list[QAExample]) -> list[str]:
    """Sorted, de-duplicated question keys: what a prompt's metadata stores about its training data."""
    return sorted({question_key(q.question, q.doc_id) for q in qas})


def check_disjoint_documents(splits: dict[str, list[QAExample]]) -> None:
    """Raise SplitLeakError when a document's questions are in more than one split."""
    owner: dict[str, str] = {}
    for split, lst in splits.items():
        for q in lst:
            if q.doc_id is None:
                continue
            first = owner.setdefault(q.doc_id, split)
            if first != split:
                raise SplitLeakError(f"document {q.doc_id!r} has questions in both {first} and {split}")


def for_department(qas: Sequence[QAExample], department: str) -> list[QAExample]:
    """As `ragpt train` filters: only the department's records when the file names departments."""
    if any(q.department for q in qas):
        return [q for q in qas if q.department in (None, department)]
    return list(qas)


def reproduces_training_hash(meta: dict, train_qas: list[QAExample], dev_qas: list[QAExample] | None) -> bool:
    """Is this the data a soft prompt was trained on? Rebuild the train/dev lists exactly as
    ragpt.training.trainer.train_prompt does and compare with the metadata's training_data_sha256."""
    want = meta.get("training_data_sha256")
    hp = meta.get("hyperparameters") or {}
    kw = {"dev_fraction": hp.get("dev_fraction", 0.15), "dev_max": hp.get("dev_max", 48), "seed": hp.get("seed", 0),
          "rule": hp.get("dev_selection", "first")}
    candidates = [select_dev(train_qas, None, **kw)]
    if dev_qas:  # trained with --dev-data
        candidates.append(select_dev(train_qas, dev_qas, **kw))
    return bool(want) and any(examples_sha256(train + dev) == want for train, dev in candidates)


def overlap_check(test_qas: Sequence[QAExample], training_keys: set[str] | None, *, verified: bool,
                  source: str) -> dict:
    """Test questions whose key is among the training keys. `verified`: the keys are provably
    those of the training data (else a clean result is marked unverified); None keys: unchecked."""
    if training_keys is None:
        return {"status": "unchecked", "overlap": None,
                "source": source or "no training questions known for this method"}
    hits = [q.question for q in test_qas if question_key(q.question, q.doc_id) in training_keys]
    status = "overlap" if hits else ("clean" if verified else "clean (unverified)")
    return {"status": status, "overlap": len(hits), "examples": hits[:3], "source": source}


def document_overlap(test_qas: Sequence[QAExample], train_qas: list[QAExample] | None,
                     dev_qas: list[QAExample] | None) -> dict:
    """Test documents that training data also asks about. Not a leak of answers, but a split
    that is not by document measures memory of the document as well as reading."""
    test_docs = {q.doc_id for q in test_qas if q.doc_id}
    if train_qas is None:
        return {"test_documents": len(test_docs), "shared_with_training_data": None, "examples": []}
    train_docs = {q.doc_id for q in train_qas + list(dev_qas or []) if q.doc_id}
    shared = sorted(test_docs & train_docs)
    return {"test_documents": len(test_docs), "shared_with_training_data": len(shared), "examples": shared[:3]}


def safe_filename(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    # Keep names short but unique: long titles get a hash suffix.
    return s if len(s) <= 80 else f"{s[:64]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def split_documents(doc_ids: list[str], fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, str]:
    """doc_id -> split, by a hash order (stable when documents are added)."""
    order = sorted(doc_ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n = len(order)
    n_train = round(fractions[0] * n)
    n_dev = round(fractions[1] * n)
    out = {}
    for i, d in enumerate(order):
        out[d] = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
    return out


def _write(out: Path, docs: dict[str, dict[str, str]], qas: dict[str, dict[str, list[QAExample]]],
           split_note: str = "") -> dict:
    for by_split in qas.values():
        check_disjoint_documents(by_split)  # hygiene checked before anything is written
    summary: dict = {"documents": {}, "questions": {}, "split": split_note}
    for dept, files in docs.items():
        for fname, text in files.items():
            atomic_write_text(out / "docs" / dept / fname, text)
        summary["documents"][dept] = len(files)
    for dept, by_split in qas.items():
        for split, lst in by_split.items():
            if lst:
                save_jsonl(lst, out / "qa" / f"{dept}.{split}.jsonl")
        summary["questions"][dept] = {s: len(v) for s, v in by_split.items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def import_doc2dial(data_dir: Path, out: Path, *, seed: int = 0, first_turn_eval: bool = True) -> dict:
    """doc2dial: agency = department; documents split 55/15/30 within each agency.

    Dev and test keep only first-turn questions (no dialogue history), as in the reference
    evaluation; train keeps every turn, with its history, as the template will serve it.
    """
    src = Path(data_dir) / "doc2dial" / "doc2dial_rc_val_compact.json"
    if not src.is_file():
        raise RagptError(f"{src} not found; set data_dir (RAGPT_DATA_DIR) to the shared data folder")
    d = json.loads(src.read_text())
    docs: dict[str, dict[str, str]] = defaultdict(dict)
    doc_file = {}
    for doc in d["documents"]:
        fname = safe_filename(doc["doc_id"]) + ".txt"
        docs[doc["domain"]][fname] = f"{doc['title'].split('#')[0]}\n\n{doc['text']}\n"
        doc_file[doc["doc_id"]] = (doc["domain"], fname, doc["text"])
    split_of: dict[str, str] = {}
    for dept in docs:
        ids = sorted(i for i, (d_, _, _) in doc_file.items() if d_ == dept)
        split_of.update(split_documents(ids, fractions=(0.55, 0.15, 0.3), seed=seed))
    qas: dict[str, dict[str, list[QAExample]]] = defaultdict(lambda: {s: [] for s in SPLITS})
    for q in d["qas"]:
        dept, fname, text = doc_file[q["doc_id"]]
        split = split_of[q["doc_id"]]
        if split != "train" and first_turn_eval and not q["first_turn"]:
            continue
        history = []
        for turn in q.get("history", []):
            role, _, content = turn.partition(":")
            history.append({"role": "assistant" if role == "agent" else "user", "content": content.strip()})
        qas[dept][split].append(QAExample(
            question=q["question"], answers=[a["text"].strip() for a in q["answers"]], id=q["id"],
            doc_id=f"{dept}/{fname}", department=dept, context=text, history=history,
        ))
    note = (f"by document within each agency (department), 55/15/30 train/dev/test by a seeded hash "
            f"order (seed {seed}); " + ("dev and test keep first-turn questions only" if first_turn_eval
                                        else "all turns in every split"))
    return _write(out, docs, qas, note)


def import_policyqa(data_dir: Path, out: Path, *, department: str = "legal") -> dict:
    """PolicyQA: one document per privacy policy (its segments as paragraphs).

    Only dev and test exist upstream: dev becomes train (+ a dev split by policy), test is test.
    """
    docs: dict[str, dict[str, str]] = defaultdict(dict)
    qas = {department: {s: [] for s in SPLITS}}
    for upstream, split in (("dev.json", "train"), ("test.json", "test")):
        src = Path(data_dir) / "policyqa" / upstream
        if not src.is_file():
            raise RagptError(f"{src} not found; set data_dir (RAGPT_DATA_DIR) to the shared data folder")
        data = json.loads(src.read_text())["data"]
        titles = [a["title"] for a in data]
        dev_titles = set(sorted(titles, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:3]) \
            if split == "train" else set()
        for article in data:
            fname = safe_filename(f"{split}-{article['title']}") + ".txt"
            segments = [p["context"].strip() for p in article["paragraphs"]]
            docs[department][fname] = f"{article['title']}\n\n" + "\n\n".join(segments) + "\n"
            s = "dev" if article["title"] in dev_titles else split
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    qas[department][s].append(QAExample(
                        question=qa["question"], answers=[a["text"] for a in qa["answers"]], id=qa["id"],
                        doc_id=f"{department}/{fname}", department=department, context=p["context"],
                    ))
    note = ("by document (privacy policy): upstream test.json is test; upstream dev.json is train, "
            "except 3 of its policies (by hash order) held out as dev")
    return _write(out, docs, qas, note)


TATQA_FILES = (("tatqa_dataset_dev.json", "dev"), ("tatqa_dataset_test_gold.json", "test"))
TATQA_ANSWER_TYPES = ("span", "multi-span")


def render_table(rows: list[list]) -> str:
    """A table as text a small model (and BM25) can read: one line per row, cells joined by ' | '.

    Empty cells are kept so that columns stay aligned with the header row; empty rows are dropped.
    """
    lines = []
    for row in rows:
        cells = [" ".join(str(c).split()) for c in row]
        if any(cells):
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def _tatqa_title(paragraphs: list[dict], uid: str) -> str:
    """First sentence of the first paragraph (TAT-QA contexts have no title), else the table id."""
    if paragraphs:
        first = " ".join(paragraphs[0]["text"].split())
        sentence = re.split(r"(?<=[.:;])\s", first, maxsplit=1)[0]
        return sentence[:100].rstrip()
    return f"Table {uid[:8]}"


def _tatqa_answers(q: dict) -> list[str]:
    """Span: the gold span(s) as alternatives. Multi-span: all spans in one answer, joined by ', '
    (token-F1 is order-free, so the joined form is scored like TAT-QA's bag of spans)."""
    ans = q["answer"] if isinstance(q["answer"], list) else [q["answer"]]
    ans = [str(a).strip() for a in ans if str(a).strip()]
    return ans if q["answer_type"] == "span" else [", ".join(ans)]


def import_tatqa(data_dir: Path, out: Path, *, department: str = "finance", seed: int = 0,
                 dev_fraction: float = 0.15) -> dict:
    """TAT-QA: one document per hybrid context (its table rendered as text, then its paragraphs).

    Only span and multi-span questions are kept: a 135M model does not do the arithmetic and
    counting ones. Upstream test is test; upstream dev is train, except a seeded `dev_fraction`
    of its contexts held out as dev (by context, so no document is in two splits).
    """
    docs: dict[str, dict[str, str]] = defaultdict(dict)
    qas = {department: {s: [] for s in SPLITS}}
    for upstream, origin in TATQA_FILES:
        src = Path(data_dir) / "tatqa" / upstream
        if not src.is_file():
            raise RagptError(f"{src} not found; set data_dir (RAGPT_DATA_DIR) to the shared data folder")
        contexts = json.loads(src.read_text())
        uids = [c["table"]["uid"] for c in contexts]
        order = sorted(uids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
        held_out = set(order[: round(dev_fraction * len(order))]) if origin == "dev" else set()
        for ctx in contexts:
            uid = ctx["table"]["uid"]
            paragraphs = sorted(ctx.get("paragraphs", []), key=lambda p: p.get("order", 0))
            body = "Table:\n" + render_table(ctx["table"]["table"])
            body += "".join("\n\n" + p["text"].strip() for p in paragraphs)
            fname = safe_filename(f"{origin}-{uid}") + ".txt"
            docs[department][fname] = f"{_tatqa_title(paragraphs, uid)}\n\n{body}\n"
            split = "test" if origin == "test" else "dev" if uid in held_out else "train"
            for q in ctx["questions"]:
                if q.get("answer_type") not in TATQA_ANSWER_TYPES or not _tatqa_answers(q):
                    continue
                qas[department][split].append(QAExample(
                    question=q["question"], answers=_tatqa_answers(q), id=q["uid"],
                    doc_id=f"{department}/{fname}", department=department, context=body,
                ))
    note = (f"by document (one TAT-QA context = one table + its paragraphs): upstream test is test; "
            f"upstream dev is train, except {dev_fraction:.0%} of its contexts (seeded hash order, "
            f"seed {seed}) held out as dev; span and multi-span questions only")
    return _write(out, docs, qas, note)


IMPORTERS = {"doc2dial": import_doc2dial, "policyqa": import_policyqa, "tatqa": import_tatqa}
