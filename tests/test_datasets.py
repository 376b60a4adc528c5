"""Importers on small fixtures laid out like ../shared/data, and split hygiene."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import write

from ragpt.data.datasets import (
    SplitLeakError,
    check_disjoint_documents,
    import_doc2dial,
    import_policyqa,
    import_tatqa,
    question_hashes,
    question_key,
    render_table,
)
from ragpt.data.qa import QAExample, load_qa
from ragpt.errors import RagptError

# ---------------------------------------------------------------------------- fixtures


def make_doc2dial(root: Path, per_agency: int = 10) -> Path:
    """doc2dial_rc_val_compact.json with two agencies, each document with a first and a later turn."""
    docs, qas = [], []
    for agency in ("dmv", "ssa"):
        for i in range(per_agency):
            doc_id = f"{agency} document {i}#1_0"
            text = f"Document {i} of the {agency}. The fee for service {i} is {10 + i} dollars."
            docs.append({"doc_id": doc_id, "domain": agency, "title": f"Service {i}#1", "text": text})
            answer = f"{10 + i} dollars"
            qas.append({"id": f"{agency}-{i}-1", "doc_id": doc_id, "domain": agency, "question": f"fee for {i}?",
                        "history": [], "first_turn": True,
                        "answers": [{"text": answer, "answer_start": text.index(answer)}]})
            qas.append({"id": f"{agency}-{i}-2", "doc_id": doc_id, "domain": agency, "question": "and then?",
                        "history": ["user: fee?", "agent: it depends"], "first_turn": False,
                        "answers": [{"text": f"Document {i}", "answer_start": 0}]})
    write(root / "doc2dial" / "doc2dial_rc_val_compact.json", json.dumps({"source": "test", "documents": docs,
                                                                          "qas": qas}))
    return root


def _squad(titles: list[str], q_per_policy: int = 2) -> dict:
    data = []
    for t in titles:
        ctx = f"{t} collects your email address and shares it with partners."
        qas = [{"id": f"{t}-{j}", "question": f"What does {t} collect ({j})?",
                "answers": [{"text": "your email address", "answer_start": ctx.index("your email")}]}
               for j in range(q_per_policy)]
        data.append({"title": t, "paragraphs": [{"context": ctx, "qas": qas}]})
    return {"version": "1.1", "data": data}


def make_policyqa(root: Path) -> Path:
    write(root / "policyqa" / "dev.json", json.dumps(_squad([f"policy{i}.com" for i in range(8)])))
    write(root / "policyqa" / "test.json", json.dumps(_squad(["other1.com", "other2.com"])))
    return root


TABLE = [["", "", "Years Ended September 30,", ""], ["", "2019", "2018", "2017"],
         ["Fixed Price", "$  1,452.4", "$  1,146.2", "$  1,036.9"], ["", "", "", ""],
         ["Total sales", "$1,496.5", "$1,202.9", "$1,107.7"]]


def _tatqa_context(uid: str) -> dict:
    return {
        "table": {"uid": uid, "table": TABLE},
        "paragraphs": [
            {"uid": f"{uid}-p2", "order": 2, "text": "On a cost-plus type contract, we are paid our costs."},
            {"uid": f"{uid}-p1", "order": 1, "text": "Sales by Contract Type: Substantially all are fixed-price."},
        ],
        "questions": [
            {"uid": f"{uid}-q1", "order": 1, "question": "What is the total sales in 2019?", "answer": ["$1,496.5"],
             "answer_type": "span", "answer_from": "table", "derivation": "", "rel_paragraphs": [], "scale": ""},
            {"uid": f"{uid}-q2", "order": 2, "question": "What are the years?", "answer": ["2019", "2018"],
             "answer_type": "multi-span", "answer_from": "table", "derivation": "", "rel_paragraphs": [],
             "scale": ""},
            {"uid": f"{uid}-q3", "order": 3, "question": "What is the change?", "answer": -12.6,
             "answer_type": "arithmetic", "answer_from": "table", "derivation": "44.1-56.7",
             "rel_paragraphs": [], "scale": "million"},
            {"uid": f"{uid}-q4", "order": 4, "question": "How many years?", "answer": 3,
             "answer_type": "count", "answer_from": "table", "derivation": "", "rel_paragraphs": [], "scale": ""},
        ],
    }


def make_tatqa(root: Path) -> Path:
    write(root / "tatqa" / "tatqa_dataset_dev.json", json.dumps([_tatqa_context(f"dev{i}") for i in range(7)]))
    write(root / "tatqa" / "tatqa_dataset_test_gold.json", json.dumps([_tatqa_context(f"test{i}") for i in range(3)]))
    return root


def _read_splits(out: Path, dept: str) -> dict[str, list[QAExample]]:
    return {s: load_qa(p) for s in ("train", "dev", "test") if (p := out / "qa" / f"{dept}.{s}.jsonl").is_file()}


def _assert_hygienic(out: Path, dept: str) -> dict[str, list[QAExample]]:
    """Every question points at a written document, and no document is in two splits."""
    splits = _read_splits(out, dept)
    owner: dict[str, set[str]] = defaultdict(set)
    for split, qas in splits.items():
        for q in qas:
            assert q.department == dept
            assert (out / "docs" / q.doc_id).is_file(), q.doc_id
            owner[q.doc_id].add(split)
    assert all(len(s) == 1 for s in owner.values()), {d: s for d, s in owner.items() if len(s) > 1}
    return splits


# ---------------------------------------------------------------------------- importers


def test_doc2dial_splits_by_document_per_agency(tmp_path):
    summary = import_doc2dial(make_doc2dial(tmp_path / "data"), tmp_path / "out")
    assert summary["documents"] == {"dmv": 10, "ssa": 10}
    assert "by document" in summary["split"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["split"] == summary["split"]
    for agency in ("dmv", "ssa"):
        splits = _assert_hygienic(tmp_path / "out", agency)
        # 55/15/30 of 10 documents: 6 (round(5.5)) / 2 / 2; train keeps both turns, dev and test first turns
        assert {s: len({q.doc_id for q in v}) for s, v in splits.items()} == {"train": 6, "dev": 2, "test": 2}
        assert len(splits["train"]) == 12 and len(splits["test"]) == 2
        assert all(q.history == [] for q in splits["test"])
        later = [q for q in splits["train"] if q.history]
        assert later and later[0].history[1] == {"role": "assistant", "content": "it depends"}


def test_policyqa_test_is_upstream_test_and_dev_is_held_out_from_upstream_dev(tmp_path):
    import_policyqa(make_policyqa(tmp_path / "data"), tmp_path / "out")
    splits = _assert_hygienic(tmp_path / "out", "legal")
    assert {q.doc_id for q in splits["test"]} == {"legal/test-other1.com.txt", "legal/test-other2.com.txt"}
    assert len({q.doc_id for q in splits["dev"]}) == 3
    assert len({q.doc_id for q in splits["train"]}) == 5
    assert all(q.answers == ["your email address"] for s in splits.values() for q in s)


def test_tatqa_keeps_span_questions_renders_tables_and_splits_by_context(tmp_path):
    summary = import_tatqa(make_tatqa(tmp_path / "data"), tmp_path / "out")
    assert summary["documents"] == {"finance": 10}
    assert "span and multi-span" in summary["split"]
    splits = _assert_hygienic(tmp_path / "out", "finance")
    # 7 upstream dev contexts: round(0.15 * 7) = 1 held out as dev; upstream test stays test
    assert {s: len({q.doc_id for q in v}) for s, v in splits.items()} == {"train": 6, "dev": 1, "test": 3}
    assert all(q.doc_id.startswith("finance/test-") for q in splits["test"])
    everything = [q for v in splits.values() for q in v]
    assert len(everything) == 20  # 2 of the 4 questions per context: arithmetic and count are dropped
    answers = {q.question: q.answers for q in everything}
    assert answers["What is the total sales in 2019?"] == ["$1,496.5"]
    assert answers["What are the years?"] == ["2019, 2018"]  # multi-span: one answer holding every span

    doc = (tmp_path / "out" / "docs" / "finance" / "test-test0.txt").read_text()
    assert doc.startswith("Sales by Contract Type:\n")  # title: first sentence of the first paragraph
    assert "Fixed Price | $ 1,452.4 | $ 1,146.2 | $ 1,036.9" in doc
    assert doc.index("Sales by Contract Type: Substantially") < doc.index("On a cost-plus")  # paragraph order
    test_q = next(q for q in splits["test"] if q.answers == ["$1,496.5"])
    assert "$1,496.5" in test_q.context  # the gold passage, for --gold-context


def test_render_table_drops_empty_rows_and_keeps_columns():
    assert render_table([["", "2019"], ["", ""], ["Sales", " $ 1 "]]) == " | 2019\nSales | $ 1"


@pytest.mark.parametrize("importer", [import_doc2dial, import_policyqa, import_tatqa])
def test_importers_name_the_missing_file(importer, tmp_path):
    with pytest.raises(RagptError, match="not found"):
        importer(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------- hygiene helpers


def test_check_disjoint_documents_rejects_a_document_in_two_splits():
    a = QAExample("q1", ["a"], doc_id="d1")
    b = QAExample("q2", ["b"], doc_id="d2")
    check_disjoint_documents({"train": [a], "test": [b]})
    with pytest.raises(SplitLeakError, match="d1"):
        check_disjoint_documents({"train": [a], "test": [b, QAExample("q3", ["c"], doc_id="d1")]})


def test_question_key_ignores_form_but_not_the_document():
    k = question_key("What is the fee?", "dmv/a.txt")
    assert question_key("  what is THE fee ", "dmv/a.txt") == k
    assert question_key("What is a fee?", "dmv/a.txt") == k  # articles are normalised away
    assert question_key("What is the fee?", "dmv/b.txt") != k  # same template, other document
    assert question_key("What is the toll?", "dmv/a.txt") != k
    assert question_hashes([QAExample("Q?", ["a"], doc_id="x"), QAExample("q", ["b"], doc_id="x")]) == \
        [question_key("q", "x")]
