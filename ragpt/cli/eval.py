"""`ragpt eval` and `ragpt import-data`: thin layers over ragpt.evaluation.runner, ragpt.evaluation.report and
ragpt.data.datasets. Registered in ragpt.cli.main as commands "eval" and "import-data"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ragpt.cli.common import fail, settings_from_ctx
from ragpt.errors import RagptError

DEFAULT_METHODS = ("none", "instruction", "soft")


def eval_cmd(
    ctx: typer.Context,
    data: Annotated[list[Path], typer.Option(
        "--data", help="Test QA file (JSONL {question, answers, department?, doc_id?} or SQuAD JSON); repeatable.")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index to retrieve from.")] = "sample",
    department: Annotated[list[str] | None, typer.Option(
        "--department", "-d", help="Department(s) to evaluate (default: every department in the data).")] = None,
    method: Annotated[list[str] | None, typer.Option(
        help="none, instruction, soft, lora; repeat to compare (default: none, instruction, soft, "
             "+ lora when --train-data is given).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(
        help="Soft prompt versions for 'soft': active, vN, or DEPT=vN; repeatable (default: active).")] = None,
    train_data: Annotated[list[Path] | None, typer.Option(
        help="Training QA file(s): LoRA trains on them; test questions are checked against them.")] = None,
    dev_data: Annotated[list[Path] | None, typer.Option(
        help="Dev QA file(s) a soft prompt was trained with (--dev-data of ragpt train); checked too.")] = None,
    instruction: Annotated[str | None, typer.Option(help="Text of the 'instruction' method.")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Retrieved chunks in the prompt (default: the evaluated "
                                                    "prompt's input contract, as served).")] = None,
    depth: Annotated[int, typer.Option(help="Ranked-list depth for recall@k and MRR.")] = 10,
    gold_context: Annotated[str, typer.Option(help="never, missed or always (as in training).")] = "never",
    max_context_tokens: Annotated[int | None, typer.Option(
        help="Prompt token budget (default: the evaluated prompt's input contract, as served).")] = None,
    limit: Annotated[int | None, typer.Option(help="Questions per department (seeded sample) for quick runs.")]
    = None,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens per answer.")] = 48,
    batch_size: Annotated[int, typer.Option(help="Questions per generate call (1: per-request latency).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for sampling, bootstrap and LoRA.")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    lora_steps: Annotated[int, typer.Option(help="LoRA reference: optimizer steps.")] = 40,
    lora_rank: Annotated[int, typer.Option(help="LoRA reference: rank.")] = 8,
    lora_lr: Annotated[float, typer.Option(help="LoRA reference: learning rate.")] = 5e-4,
    lora_batch_size: Annotated[int, typer.Option(help="LoRA reference: examples per step.")] = 4,
    allow_overlap: Annotated[bool, typer.Option(
        "--allow-overlap", help="Report (flagged) instead of refusing when test questions are in training data.")]
    = False,
    out: Annotated[Path, typer.Option(help="Report folder: results.json, report.md, PNG plots.")]
    = Path("eval-report"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Evaluate methods (no prompt, instruction, soft prompts, LoRA) on a QA set; write a report.

    Per department and overall: retrieval hit rate / recall@k / MRR, EM, token-F1, ROUGE-L,
    groundedness and latency, with seeded bootstrap 95% intervals. Refuses a test set that
    overlaps a method's training data.
    """
    import ragpt
    from ragpt.atomic import sha256_file
    from ragpt.data.qa import load_qa
    from ragpt.evaluation.report import write_report
    from ragpt.evaluation.runner import EvalConfig, group_by_department, run_evaluation
    from ragpt.lm.generator import load_generator, resolve_bf16
    from ragpt.lm.models import load_embedder
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever
    from ragpt.serving.contract import InputContract
    from ragpt.softprompts.artifact import utc_now
    from ragpt.softprompts.registry import PromptRegistry
    from ragpt.training.lora import LoraSettings

    try:
        s = settings_from_ctx(ctx)
        kinds = list(method or [*DEFAULT_METHODS, *(["lora"] if train_data else [])])
        cfg = EvalConfig(k=k, depth=depth, gold_context=gold_context, max_context_tokens=max_context_tokens,
                         max_new_tokens=max_tokens, batch_size=batch_size, limit=limit, seed=seed,
                         n_bootstrap=bootstrap)
        cfg.check()
        by_dept = group_by_department([q for path in data for q in load_qa(path)], department)
        train_qas = [q for p in train_data for q in load_qa(p)] if train_data else None
        dev_qas = [q for p in dev_data for q in load_qa(p)] if dev_data else None
        doc_index = DocumentIndex.open(s.index_dir, index)
        for d in by_dept:  # fail on a wrong department before any model loads
            doc_index.check_department(d)
        retriever = Retriever(doc_index, load_embedder(s), dense=s.dense, bm25=s.bm25, rrf_k=s.rrf_k)
        generator = load_generator(s)
        bf16 = resolve_bf16(s.bf16)
        run = run_evaluation(
            generator, generator.base_model, retriever, by_dept, default_contract=InputContract.from_settings(s),
            methods=kinds, prompt_specs=prompt or ["active"], registry=PromptRegistry(s.prompt_dir),
            train_qas=train_qas, dev_qas=dev_qas, instruction=instruction or _default_instruction(),
            lora=LoraSettings(rank=lora_rank, alpha=2 * lora_rank, steps=lora_steps, lr=lora_lr,
                              batch_size=lora_batch_size, seed=seed, bf16=bf16),
            lora_dir=out / "lora", cfg=cfg, allow_overlap=allow_overlap, progress=not quiet,
        )
        files = [{"role": "test", "path": str(p), "sha256": sha256_file(p)} for p in data]
        files_train = [{"role": role, "path": str(p), "sha256": sha256_file(p)}
                       for role, paths in (("train", train_data), ("dev", dev_data)) for p in paths or []]
        run.results["run"].update(created=utc_now(), generator=s.generator, ragpt_version=ragpt.__version__)
        run.results["data"] = {"test_files": files, "train_files": files_train, "split": split_note(data)}
        if method is None and not train_data:
            run.results["notes"].append("lora reference not run: it needs --train-data")
        written = write_report(run.results, run.predictions, out)
    except (RagptError, ValueError) as e:
        fail(e)
    _echo_summary(run.results)
    typer.echo(f"report: {written['markdown']}  (results: {written['json']})")


def _default_instruction() -> str:
    from ragpt.evaluation.runner import DEFAULT_INSTRUCTION

    return DEFAULT_INSTRUCTION


def split_note(paths: list[Path]) -> str | None:
    """How the QA files were split, from the importer's summary.json (<out>/qa/x.jsonl -> <out>/summary.json)."""
    notes = []
    for p in paths:
        summary = Path(p).resolve().parent.parent / "summary.json"
        try:
            note = json.loads(summary.read_text(encoding="utf-8")).get("split")
        except (OSError, ValueError, AttributeError):
            note = None
        if note and note not in notes:
            notes.append(note)
    return "; ".join(notes) or None


def _echo_summary(results: dict) -> None:
    from ragpt.evaluation.report import fmt_ci, fmt_diff

    for d, dept in [*results["departments"].items(), ("overall", results["overall"])]:
        r = dept["retrieval"]
        typer.echo(f"{d}: n={dept['n']}, doc hit@{r['k']} {fmt_ci(r['document']['hit_at_k'])}, "
                   f"span hit@{r['k']} {fmt_ci(r['answer_span']['hit_at_k'])}")
        for name, m in dept["methods"].items():
            diff = f"  vs none {fmt_diff(m['vs_none']['f1'])}" if "vs_none" in m else ""
            typer.echo(f"  {name:14s} F1 {fmt_ci(m['f1'])}  EM {fmt_ci(m['em'])}{diff}")


def import_data(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Data set: doc2dial, policyqa or tatqa.")],
    out: Annotated[Path, typer.Option(help="Output folder (docs/<dept>/ and qa/<dept>.<split>.jsonl).")],
) -> None:
    """Convert a shared public QA set (under data_dir) into documents + QA files for ingest/train/eval.

    Splits are by document; summary.json says how, and `ragpt eval` reports it.
    """
    from ragpt.data.datasets import IMPORTERS

    if name not in IMPORTERS:
        fail(RagptError(f"unknown data set {name!r}; known: {', '.join(IMPORTERS)}"))
    try:
        summary = IMPORTERS[name](settings_from_ctx(ctx).data_dir, out)
    except RagptError as e:
        fail(e)
    typer.echo(json.dumps(summary, indent=2))
