"""Importers for the public QA sets in the shared data folder (settings.data_dir).

Each importer writes a self-contained folder that the ordinary CLI consumes:
    <out>/docs/<department>/<document>.txt      ingest with `ragpt ingest -d <department>`
    <out>/qa/<department>.<split>.jsonl         train / evaluate with `--data`
Splits are by *document* (a document's questions all land in one split), deterministic.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

from ragpt.atomic import atomic_write_text
from ragpt.errors import RagptError
from ragpt.qa import QAExample, save_jsonl

SPLITS = ("train", "dev", "test")


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


def _write(out: Path, docs: dict[str, dict[str, str]], qas: dict[str, dict[str, list[QAExample]]]) -> dict:
    summary: dict = {"documents": {}, "questions": {}}
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
    return _write(out, docs, qas)


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
    return _write(out, docs, qas)


IMPORTERS = {"doc2dial": import_doc2dial, "policyqa": import_policyqa}
