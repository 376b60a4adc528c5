"""The main job on the embedded defaults: ingest the sample corpus and answer its questions."""

from __future__ import annotations

import time

from ragpt.config import Settings
from ragpt.index import DocumentIndex
from ragpt.ingest import ingest
from ragpt.models import load_embedder
from ragpt.pipeline import Pipeline, Question
from ragpt.sample import SAMPLE_DEPARTMENTS, department_dir, sample_questions, source_matches

BATCH = 8  # questions of one department answered in one batched generation


def run_demo(settings: Settings, *, index: str = "sample", limit: int | None = None,
             progress: bool = True, out=print) -> dict:
    embedder = load_embedder(settings)
    for dept in SAMPLE_DEPARTMENTS:
        rep = ingest(settings.index_dir, index, [department_dir(dept)], [dept], embedder,
                     chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                     batch_size=settings.embed_batch_size, progress=progress)
        out(f"[ingest] {dept}: {len(rep.added)} added, {len(rep.replaced)} replaced, "
            f"{len(rep.unchanged)} unchanged, {rep.chunks_embedded} chunks embedded "
            f"({rep.chunks_per_second:.0f} chunks/s)")

    pipe = Pipeline(DocumentIndex.open(settings.index_dir, index), settings, embedder=embedder)
    stats = {"questions": 0, "source_in_top_k": 0, "answer_seconds": 0.0}
    for dept in SAMPLE_DEPARTMENTS:
        qs = sample_questions(dept)[:limit]
        out(f"\n=== {dept}: {len(qs)} questions ===")
        for i in range(0, len(qs), BATCH):
            batch = qs[i:i + BATCH]
            t0 = time.perf_counter()
            answers = pipe.ask_many([Question(q.question, dept) for q in batch])
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
    out(f"\nNext: `ragpt ask -i {index} -d hr \"...\"`, train a department prompt with `ragpt train`, "
        "release it with `ragpt prompts approve/activate`, serve with `ragpt serve --config service.toml` "
        "(see README).")
    return stats
