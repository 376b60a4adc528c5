"""The main job on the embedded defaults: ingest the sample corpus and answer its questions, then
serve the departments whose soft prompts ship in prompts/ (doc2dial agencies, PolicyQA as legal)
when the shared data sets are present under the data_dir setting."""

from __future__ import annotations

import time
from pathlib import Path

from ragpt.config import Settings
from ragpt.data.datasets import IMPORTERS
from ragpt.data.documents import source_matches
from ragpt.data.ingest import ingest
from ragpt.data.qa import load_qa
from ragpt.data.sample import SAMPLE_DEPARTMENTS, SAMPLE_DIR, department_dir, sample_questions
from ragpt.evaluation.metrics import best_over, token_f1
from ragpt.lm.models import load_embedder
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest
from ragpt.softprompts.registry import PromptRegistry

BATCH = 8  # questions of one department answered in one batched generation
# Departments whose prompts benchmarks/department_prompts.sh trains and ships, and their data set.
SHIPPED_DEPARTMENTS = {"dmv": "doc2dial", "ssa": "doc2dial", "va": "doc2dial", "studentaid": "doc2dial",
                       "legal": "policyqa"}
SHIPPED_INDEX = "shared"  # the index the shipped prompts were trained against
# Sample sources are relative to the folder holding the ragpt package ("ragpt/data/sample_corpus/hr/..."):
# wherever ragpt is installed, and the same as an index built from a checkout's root before sources
# were root-relative, so such an index is matched, not duplicated.
SAMPLE_ROOT = SAMPLE_DIR.parents[2]


def run_demo(settings: Settings, *, index: str = "sample", limit: int | None = None,
             progress: bool = True, out=print) -> dict:
    embedder = load_embedder(settings)
    for dept in SAMPLE_DEPARTMENTS:
        rep = ingest(settings.index_dir, index, [department_dir(dept)], [dept], embedder, source_root=SAMPLE_ROOT,
                     chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                     batch_size=settings.embed_batch_size, progress=progress)
        out(f"[ingest] {dept}: {len(rep.added)} added, {len(rep.replaced)} replaced, "
            f"{len(rep.unchanged)} unchanged, {rep.chunks_embedded} chunks embedded "
            f"({rep.chunks_per_second:.0f} chunks/s)")
        _report_problems(dept, rep, out)

    pipe = Pipeline(DocumentIndex.open(settings.index_dir, index), settings, embedder=embedder)
    stats = {"questions": 0, "source_in_top_k": 0, "answer_seconds": 0.0}
    for dept in SAMPLE_DEPARTMENTS:
        qs = sample_questions(dept)[:limit]
        out(f"\n=== {dept}: {len(qs)} questions ===")
        for i in range(0, len(qs), BATCH):
            batch = qs[i:i + BATCH]
            t0 = time.perf_counter()
            answers = pipe.ask_many([ChatRequest(q.question, dept) for q in batch])
            stats["answer_seconds"] += time.perf_counter() - t0
            for q, a in zip(batch, answers):
                hit = any(source_matches(c.source, q.source) for c in a.citations)
                stats["questions"] += 1
                stats["source_in_top_k"] += hit
                out(f"\nQ: {q.question}\nA: {a.text}")
                for n, c in enumerate(a.citations, start=1):
                    mark = "*" if source_matches(c.source, q.source) else " "
                    out(f"  {mark}[{n}] {c.source} #chunk {c.chunk} (score {c.score:.4f})")
                out(f"  expected: {q.answers[0]!r} from {q.source}")
    n = max(stats["questions"], 1)
    out(f"\n{stats['questions']} questions; gold source in top-{settings.k}: "
        f"{stats['source_in_top_k']}/{stats['questions']} ({100 * stats['source_in_top_k'] / n:.0f}%); "
        f"{stats['answer_seconds'] / n:.2f}s per answer (batches of {BATCH})")
    stats["shipped"] = serve_shipped_departments(settings, embedder, limit=limit, progress=progress, out=out)
    out(f"\nNext: `ragpt ask -i {index} -d hr \"...\"`, train a department prompt with `ragpt train`, "
        "release it with `ragpt prompts approve/activate`, serve with `ragpt serve --config service.toml` "
        "(see README).")
    return stats


def _report_problems(dept: str, rep, out) -> None:
    for source, reason in rep.problems:
        out(f"[ingest] {dept}: not ingested {source}: {reason}")


def serve_shipped_departments(settings: Settings, embedder, *, limit: int | None = None,
                              progress: bool = True, out=print) -> dict:
    """Answer held-out test questions of each department that has prompts in prompts/, without
    and with its active prompt (token-F1 against the reference answers).

    Needs the public data sets under `settings.data_dir` (documents and test questions);
    imports them into cache_dir once and ingests them into the index "shared" (unchanged
    documents are skipped on later runs).
    """
    registry = PromptRegistry(settings.prompt_dir)
    known = set(registry.departments())  # one directory listing, not one per department
    shipped = [d for d in SHIPPED_DEPARTMENTS if d in known]
    if not shipped:
        out(f"\n(no department prompts in {settings.prompt_dir}; benchmarks/department_prompts.sh "
            "trains and releases them)")
        return {}
    data_sets = sorted({SHIPPED_DEPARTMENTS[d] for d in shipped})
    missing = [n for n in data_sets if not (Path(settings.data_dir) / n).is_dir()]
    if missing:
        out(f"\n(shipped prompts for {', '.join(shipped)} not demonstrated: {', '.join(missing)} not found under "
            f"data_dir={settings.data_dir}; set RAGPT_DATA_DIR)")
        return {}
    imported = Path(settings.cache_dir) / "shared-qa"
    for name in data_sets:
        if not (imported / name / "summary.json").is_file():
            IMPORTERS[name](Path(settings.data_dir), imported / name)
    for d in shipped:
        docs = imported / SHIPPED_DEPARTMENTS[d] / "docs"  # the root: sources keep the department folder
        rep = ingest(settings.index_dir, SHIPPED_INDEX, [docs / d], [d], embedder, source_root=docs,
                     chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                     batch_size=settings.embed_batch_size, progress=progress)
        out(f"[ingest] {d}: {len(rep.added)} added, {len(rep.unchanged)} unchanged")
        _report_problems(d, rep, out)

    # Each prompt is served with its own input contract (the inputs it was trained on).
    pipe = Pipeline(DocumentIndex.open(settings.index_dir, SHIPPED_INDEX), settings, embedder=embedder)
    results = {}
    for d in shipped:
        version = registry.active_version(d)
        qs = load_qa(imported / SHIPPED_DEPARTMENTS[d] / "qa" / f"{d}.test.jsonl")[: limit or BATCH]
        # No prompt, built with the same inputs as the prompt it is compared with (a paired comparison).
        contract = pipe.resolve(d, version)[2] if version else None
        plain = pipe.ask_many([ChatRequest(q.question, d, prompt="none", contract=contract) for q in qs])
        if version is None:  # released prompts can be pulled (ragpt prompts deactivate): base model only
            out(f"\n=== {d}: no active soft prompt (see `ragpt prompts list -d {d}`), {len(qs)} held-out "
                "test questions ===")
            for q, a0 in zip(qs, plain):
                out(f"\nQ: {q.question}\nA (no prompt): {a0.text}\n  expected: {q.answers[0]!r}")
            results[d] = {"version": None, "questions": len(qs)}
            continue
        tuned = pipe.ask_many([ChatRequest(q.question, d, prompt=version) for q in qs])
        out(f"\n=== {d}: soft prompt {version}, {len(qs)} held-out test questions ===")
        f1_plain = f1_tuned = 0.0
        for q, a0, a1 in zip(qs, plain, tuned):
            f0, f1 = best_over(token_f1, a0.text, q.answers), best_over(token_f1, a1.text, q.answers)
            f1_plain, f1_tuned = f1_plain + f0, f1_tuned + f1
            out(f"\nQ: {q.question}\nA ({version}): {a1.text}\nA (no prompt): {a0.text}\n"
                f"  expected: {q.answers[0]!r}  token-F1 {100 * f1:.0f} vs {100 * f0:.0f}")
        n = max(1, len(qs))
        results[d] = {"version": version, "questions": len(qs), "f1_no_prompt": round(100 * f1_plain / n, 1),
                      "f1_soft_prompt": round(100 * f1_tuned / n, 1)}
        out(f"\n{d}: token-F1 {results[d]['f1_soft_prompt']} with {version} vs "
            f"{results[d]['f1_no_prompt']} without (n={len(qs)}; full evaluation: README)")
    return results
