"""The main job on the embedded defaults: ingest the sample corpus and answer its questions, then
serve the departments whose soft prompts ship in prompts/ (doc2dial agencies, PolicyQA as legal)
when the shared data sets are present under the data_dir setting."""

from __future__ import annotations

import time
from pathlib import Path

from ragpt.config import Settings
from ragpt.data.datasets import IMPORTERS
from ragpt.data.documents import source_matches
from ragpt.data.ingest import ChunkingMismatchError, ingest, settings_chunking
from ragpt.data.qa import load_qa
from ragpt.data.sample import SAMPLE_DEPARTMENTS, SAMPLE_DIR, department_dir, sample_questions
from ragpt.errors import RagptError
from ragpt.evaluation.metrics import best_over, exact_match, token_f1
from ragpt.lm.models import load_embedder
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest
from ragpt.softprompts.registry import PromptRegistry

BATCH = 8  # questions of one department answered in one batched generation
# Departments whose prompts benchmarks/department_prompts.sh trains and ships, and their data set.
SHIPPED_DEPARTMENTS = {"dmv": "doc2dial", "ssa": "doc2dial", "va": "doc2dial", "studentaid": "doc2dial",
                       "legal": "policyqa"}
SHIPPED_INDEX = "shared"  # the index of a shipped prompt that records none
# The indexes the shipped prompts were trained against and how each cuts documents: a prompt is
# served on the kind of passage it learned (each prompt's meta records its index's name). Literal
# values, not the settings' defaults: they describe how the shipped prompts were trained.
SHIPPED_INDEXES = {
    "shared": {"chunk_tokens": 200, "chunk_overlap": 40, "chunk_splitter": "recursive"},
    "shared-sentences": {"chunk_tokens": 200, "chunk_overlap": 40, "chunk_splitter": "sentences"},
}
# Sample sources are relative to the folder holding the ragpt package ("ragpt/data/sample_corpus/hr/..."),
# wherever ragpt is installed: the same names as `ragpt ingest --root .` from a checkout gives them.
SAMPLE_ROOT = SAMPLE_DIR.parents[2]


def run_demo(settings: Settings, *, index: str = "sample", limit: int | None = None,
             progress: bool = True, out=print) -> dict:
    embedder = load_embedder(settings)
    for dept in SAMPLE_DEPARTMENTS:
        rep = ingest(settings.index_dir, index, [department_dir(dept)], [dept], embedder, source_root=SAMPLE_ROOT,
                     new_chunking=settings_chunking(settings), batch_size=settings.embed_batch_size,
                     progress=progress)
        out(f"[ingest] {dept}: {len(rep.added)} added, {len(rep.replaced)} replaced, "
            f"{len(rep.unchanged)} unchanged, {rep.chunks_embedded} chunks embedded "
            f"({rep.chunks_per_second:.0f} chunks/s)")
        _report_problems(dept, rep, out)

    pipe = Pipeline(DocumentIndex.open(settings.index_dir, index), settings, embedder=embedder)
    registry = PromptRegistry(settings.prompt_dir)
    known = set(registry.departments())
    stats: dict = {"questions": 0, "source_in_top_k": 0, "answer_seconds": 0.0, "departments": {}}
    for dept in SAMPLE_DEPARTMENTS:
        qs = sample_questions(dept)[:limit]
        version = registry.active_version(dept) if dept in known else None
        out(f"\n=== {dept}: {len(qs)} questions, " + (f"soft prompt {version} and no prompt ===" if version
                                                      else "no soft prompt ==="))
        t0 = time.perf_counter()
        rows = compare_with_and_without(pipe, dept, [(q.question, q.answers) for q in qs], version)
        stats["answer_seconds"] += time.perf_counter() - t0
        for q, (tuned, plain) in zip(qs, rows):
            shown = tuned or plain
            hit = any(source_matches(c.source, q.source) for c in shown.citations)
            stats["questions"] += 1
            stats["source_in_top_k"] += hit
            out(_qa_block(q.question, q.answers, version, tuned, plain))
            for n, c in enumerate(shown.citations, start=1):
                mark = "*" if source_matches(c.source, q.source) else " "
                out(f"  {mark}[{n}] {c.source} #chunk {c.chunk} (score {c.score:.4f})")
            out(f"  from {q.source}")
        stats["departments"][dept] = summary = summarise(dept, [(q.answers, t, p) for q, (t, p) in zip(qs, rows)],
                                                         version)
        out(f"\n{describe(dept, summary)}")
    n = max(stats["questions"], 1)
    out(f"\n{stats['questions']} questions; gold source in top-{settings.k}: "
        f"{stats['source_in_top_k']}/{stats['questions']} ({100 * stats['source_in_top_k'] / n:.0f}%); "
        f"{stats['answer_seconds'] / n:.2f}s per question (batches of {BATCH}, with and without the prompt)")
    for dept, summary in stats["departments"].items():
        out(describe(dept, summary))
    stats["shipped"] = serve_shipped_departments(settings, embedder, limit=limit, progress=progress, out=out,
                                                 generator=pipe.generator)
    out(f"\nNext: `ragpt ask -i {index} -d hr \"...\"`, train a department prompt with `ragpt train`, "
        "release it with `ragpt prompts approve/activate`, serve with `ragpt serve --config service.toml` "
        "(see README).")
    return stats


def compare_with_and_without(pipe: Pipeline, dept: str, questions: list[tuple[str, list[str]]],
                             version: str | None) -> list[tuple]:
    """(answer with the version, answer without a prompt) per question, in batches; without a
    version, (None, answer). The no-prompt answers use the version's input contract (and its query
    adapter, if it has one), so the two differ only by the soft prompt."""
    contract = pipe.resolve(dept, version)[2] if version else None
    rows: list[tuple] = []
    for i in range(0, len(questions), BATCH):
        part = questions[i:i + BATCH]
        plain = pipe.ask_many([ChatRequest(q, dept, prompt="none", contract=contract, query_adapter_of=version)
                               for q, _ in part])
        tuned = [None] * len(part)
        if version:
            tuned = pipe.ask_many([ChatRequest(q, dept, prompt=version) for q, _ in part])
        rows += list(zip(tuned, plain))
    return rows


def _qa_block(question: str, answers: list[str], version: str | None, tuned, plain) -> str:
    lines = [f"\nQ: {question}"]
    if tuned is not None:
        lines.append(f"A ({version}): {tuned.text}")
    lines.append(f"A (no prompt): {plain.text}")
    scores = f"token-F1 {100 * best_over(token_f1, plain.text, answers):.0f}"
    if tuned is not None:
        scores = f"token-F1 {100 * best_over(token_f1, tuned.text, answers):.0f} vs " + scores.split()[-1]
    lines.append(f"  expected: {answers[0]!r}  {scores}")
    return "\n".join(lines)


def summarise(dept: str, rows: list[tuple[list[str], object, object]], version: str | None) -> dict:
    """Token-F1 and exact match (%) of the answers with and without the prompt."""
    n = max(1, len(rows))

    def mean(metric, which: int) -> float:
        return round(100 * sum(best_over(metric, r[which].text, r[0]) for r in rows) / n, 1)

    out = {"version": version, "questions": len(rows), "f1_no_prompt": mean(token_f1, 2),
           "em_no_prompt": mean(exact_match, 2)}
    if version:
        out.update(f1_soft_prompt=mean(token_f1, 1), em_soft_prompt=mean(exact_match, 1))
    return out


def describe(dept: str, s: dict) -> str:
    if not s.get("version"):
        return (f"{dept}: no active soft prompt; token-F1 {s['f1_no_prompt']}, exact match {s['em_no_prompt']} "
                f"(n={s['questions']})")
    return (f"{dept}: token-F1 {s['f1_soft_prompt']} with {s['version']} vs {s['f1_no_prompt']} without, exact "
            f"match {s['em_soft_prompt']} vs {s['em_no_prompt']} (n={s['questions']})")


def trained_index(registry: PromptRegistry, dept: str) -> str:
    """The index `dept`'s active prompt was trained against (SHIPPED_INDEX without an active
    prompt, or for one that records none); unknown to the demo: RagptError."""
    version = registry.active_version(dept)
    name = (registry.meta(dept, version).get("extra") or {}).get("index") if version else None
    name = name or SHIPPED_INDEX
    if name not in SHIPPED_INDEXES:
        raise RagptError(f"{dept} {version} was trained against index {name!r}, which the demo does not know "
                         f"how to rebuild (it knows {', '.join(sorted(SHIPPED_INDEXES))})")
    return name


def _report_problems(dept: str, rep, out) -> None:
    for source, reason in rep.problems:
        out(f"[ingest] {dept}: not ingested {source}: {reason}")


def serve_shipped_departments(settings: Settings, embedder, *, limit: int | None = None,
                              progress: bool = True, out=print, generator=None) -> dict:
    """Answer held-out test questions of each department that has prompts in prompts/, without
    and with its active prompt (token-F1 against the reference answers).

    Needs the public data sets under `settings.data_dir` (documents and test questions);
    imports them into cache_dir once and ingests them into the index each active prompt was
    trained against (SHIPPED_INDEXES: "shared" or "shared-sentences", chunked as in training;
    unchanged documents are skipped on later runs). One generator serves every index.
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
    # Each department is served from the index its active prompt was trained against, with that
    # index's chunking; every index in use holds every shipped department (as in training, where
    # BM25's statistics came from all of them).
    index_of = {}
    for d in shipped:
        try:
            index_of[d] = trained_index(registry, d)
        except RagptError as e:
            out(f"\n({d} not demonstrated: {e})")
    for name in sorted(set(index_of.values())):
        for d in index_of:
            docs = imported / SHIPPED_DEPARTMENTS[d] / "docs"  # the root: sources keep the department folder
            try:
                rep = ingest(settings.index_dir, name, [docs / d], [d], embedder, source_root=docs,
                             **SHIPPED_INDEXES[name], batch_size=settings.embed_batch_size, progress=progress)
            except ChunkingMismatchError as e:
                raise RagptError(f"{e} (the shipped prompts were trained on index {name!r} chunked that way: "
                                 f"`ragpt index delete {name}` and the demo rebuilds it)") from None
            out(f"[ingest] {d} into {name}: {len(rep.added)} added, {len(rep.unchanged)} unchanged")
            _report_problems(d, rep, out)

    # Each prompt is served with its own input contract (the inputs it was trained on).
    pipes = {name: Pipeline(DocumentIndex.open(settings.index_dir, name), settings, embedder=embedder,
                            generator=generator) for name in sorted(set(index_of.values()))}
    results = {}
    for d in index_of:
        version = registry.active_version(d)
        qs = load_qa(imported / SHIPPED_DEPARTMENTS[d] / "qa" / f"{d}.test.jsonl")[: limit or BATCH]
        if version is None:  # released prompts can be pulled (ragpt prompts deactivate): base model only
            out(f"\n=== {d}: no active soft prompt (see `ragpt prompts list -d {d}`), {len(qs)} held-out "
                "test questions ===")
        else:
            out(f"\n=== {d}: soft prompt {version}, {len(qs)} held-out test questions ===")
        rows = compare_with_and_without(pipes[index_of[d]], d, [(q.question, q.answers) for q in qs], version)
        for q, (tuned, plain) in zip(qs, rows):
            out(_qa_block(q.question, q.answers, version, tuned, plain))
        results[d] = {**summarise(d, [(q.answers, t, p) for q, (t, p) in zip(qs, rows)], version),
                      "index": index_of[d]}
        out(f"\n{describe(d, results[d])} (full evaluation: README)")
    return results
