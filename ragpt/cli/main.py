"""`ragpt` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ragpt.cli.common import fail as _fail
from ragpt.cli.common import settings_from_ctx as _settings
from ragpt.cli.eval import eval_cmd, import_data
from ragpt.cli.prompts import prompts_app
from ragpt.cli.serve import serve
from ragpt.config import TRAIN_DEFAULTS
from ragpt.errors import RagptError

app = typer.Typer(
    help="ragpt: retrieval-augmented generation with department-specific soft prompts "
    "over one frozen LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="List, inspect and delete indexes.", no_args_is_help=True)
models_app = typer.Typer(help="Prepare and inspect the generator and embedder.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(models_app, name="models")
app.add_typer(prompts_app, name="prompts")
app.command()(serve)
app.command("eval")(eval_cmd)
app.command("import-data")(import_data)




@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="TOML config file (default: ./ragpt.toml).")] = None,
    index_dir: Annotated[Path | None, typer.Option(help="Folder holding indexes.")] = None,
    prompt_dir: Annotated[Path | None, typer.Option(help="Soft-prompt registry folder.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache folder.")] = None,
    generator: Annotated[str | None, typer.Option(help="Generator: embedded default or HF folder/name.")] = None,
    embedder: Annotated[str | None, typer.Option(help="Embedder: embedded default or ST folder/name.")] = None,
    bf16: Annotated[str | None, typer.Option(help="bf16 autocast: auto, on or off.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")] = None,
) -> None:
    """Settings come from defaults < config file < RAGPT_* environment < these flags."""
    if config is not None:
        os.environ["RAGPT_CONFIG"] = str(config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    ctx.obj = dict(index_dir=index_dir, prompt_dir=prompt_dir, cache_dir=cache_dir,
                   generator=generator, embedder=embedder, bf16=bf16, threads=threads)


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (.txt .md .html .pdf).")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index name (folder under index_dir).")],
    department: Annotated[list[str] | None, typer.Option("--department", "-d",
        help="Department that may read these documents; repeat to share. With --delete: only "
             "documents these departments read, and only their access.")] = None,
    root: Annotated[Path | None, typer.Option("--root",
        help="Store sources relative to this folder (default: each folder given; a file's parent).")] = None,
    delete: Annotated[bool, typer.Option("--delete",
        help="Remove the named documents instead (relative path, glob, or path as ingested).")] = False,
    strict: Annotated[bool, typer.Option("--strict",
        help="Abort on the first file that cannot be ingested, writing nothing.")] = False,
    chunk_tokens: Annotated[int | None, typer.Option(help="Chunk size in embedder tokens.")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Overlap between chunks, tokens.")] = None,
    chunk_splitter: Annotated[str | None, typer.Option(
        help="recursive (paragraphs first) or sentences (whole sentences packed, overlap across paragraphs).")] = None,
    index_type: Annotated[str | None, typer.Option("--index-type",
        help="Dense search structure from now on: auto (flat while small, then ivf), flat or ivf "
             "(default for a new index: the index_type setting).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Add or update documents in an index (unchanged ones are skipped), or --delete them.

    A document is identified by its path relative to the root and its departments, so ingesting
    the same files again from any working directory changes nothing. Files that cannot be ingested
    (unsupported type, no extractable text, parse error, not UTF-8) are listed on stderr and the
    rest is ingested. Exit status: 0 all ingested; 1 some files skipped or failed; 2 bad input or
    --strict failure, nothing written.
    """
    from ragpt.data.documents import collect_documents
    from ragpt.data.ingest import delete_documents, settings_chunking
    from ragpt.data.ingest import ingest as run_ingest
    from ragpt.lm.models import load_embedder

    try:
        s = _settings(ctx, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, chunk_splitter=chunk_splitter)
        if delete:
            rep = delete_documents(s.index_dir, index, [str(p) for p in paths], department)
            _echo_delete(index, rep)
            return
        if not department:  # fail on bad input before the embedder loads
            raise RagptError("at least one --department is required")
        collect_documents(paths, root)
        rep = run_ingest(
            s.index_dir, index, paths, department, load_embedder(s), source_root=root, strict=strict,
            chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, chunk_splitter=chunk_splitter,
            new_chunking=settings_chunking(s),
            batch_size=s.embed_batch_size, progress=not quiet, index_type=index_type,
            new_index_type=s.index_type,
        )
    except RagptError as e:
        _fail(e)
    for kind, problems in (("skipped", rep.skipped), ("failed", rep.failed)):
        for source, reason in problems:
            typer.echo(f"{kind} {source}: {reason}", err=True)
    migrated = f", {len(rep.migrated)} migrated" if rep.migrated else ""
    typer.echo(
        f"index {index}: {len(rep.added)} added, {len(rep.replaced)} replaced, "
        f"{len(rep.unchanged)} unchanged, {len(rep.relabelled)} relabelled{migrated}; "
        f"{rep.chunks_embedded} chunks embedded in {rep.embed_seconds:.1f}s "
        f"({rep.chunks_per_second:.0f} chunks/s); total {rep.seconds:.1f}s"
    )
    if rep.problems:
        typer.echo(f"{len(rep.skipped)} skipped, {len(rep.failed)} failed (each listed on stderr)", err=True)
        raise typer.Exit(code=1)


def _echo_delete(index: str, rep) -> None:
    if rep.deleted:
        typer.echo(f"deleted {len(rep.deleted)} document(s) from {index}: {', '.join(rep.deleted)}")
    if rep.relabelled:
        typer.echo(f"kept {len(rep.relabelled)} document(s) for their other departments: {', '.join(rep.relabelled)}")


def _print_answer(ans, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(ans.to_dict(), ensure_ascii=False))
        return
    typer.echo(ans.text)
    for i, c in enumerate(ans.citations, start=1):
        typer.echo(f"  [{i}] {c.source} #chunk {c.chunk} (score {c.score:.4f}) {c.title}")


@app.command()
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.")],
    department: Annotated[str, typer.Option("--department", "-d", help="Department asking.")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index name.")] = "sample",
    prompt: Annotated[str, typer.Option(help="Soft prompt: active, none, or a version such as v3.")] = "active",
    history: Annotated[str | None, typer.Option(
        help='Earlier turns as JSON: [{"role": "user", "content": "..."}, {"role": "assistant", ...}].')] = None,
    system: Annotated[str | None, typer.Option(help="Client system text, appended to the department's.")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Chunks to retrieve (default: the prompt's contract).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer object as JSON.")] = False,
    prompt_embeds_out: Annotated[Path | None, typer.Option(
        "--prompt-embeds-out", metavar="FILE",
        help="Instead of answering, write the request's input as prompt embeddings (soft prompt, then the "
             "prompt's token embeddings): FILE.safetensors holds the tensor, any other FILE (or - for stdout) "
             "a JSON body for vLLM's POST /v1/completions (vllm serve --enable-prompt-embeds). Plain prompts "
             "only.")] = None,
    prompt_embeds_dtype: Annotated[str | None, typer.Option(
        help="The tensor's dtype for --prompt-embeds-out: float32, bfloat16 or float16 (default: ragpt's).")] = None,
) -> None:
    """Answer with the department's soft prompt, built with the prompt version's input contract."""
    from ragpt.serving.pipeline import Pipeline

    try:
        turns = _history_turns(history)
        s = _settings(ctx, max_new_tokens=max_tokens, temperature=temperature)
        pipe = Pipeline.open(index, settings=s)
        if prompt_embeds_out is not None:
            from ragpt.serving.request import ChatRequest

            # The request `ask` would answer (the same fields), prepared by the one request path.
            request = ChatRequest(question, department, history=turns, system=system, prompt=prompt,
                                  overrides={"k": k} if k is not None else None)
            _write_prompt_embeds(pipe, request, prompt_embeds_out, prompt_embeds_dtype, as_json)
            return
        ans = pipe.ask(question, department, history=turns, system=system, prompt=prompt, k=k)
    except RagptError as e:
        _fail(e)
    _print_answer(ans, as_json)


def _write_prompt_embeds(pipe, request, out: Path, dtype: str | None, as_json: bool) -> None:
    from dataclasses import asdict

    from ragpt.atomic import atomic_write_bytes
    from ragpt.serving.prompt_embeds import build_prompt_embeds

    pe = build_prompt_embeds(pipe, request, dtype=dtype)
    if str(out) == "-":  # the body alone, for a pipe: ragpt ask ... --prompt-embeds-out - | curl -d @- ...
        typer.echo(json.dumps(pe.completion_body()))
        return
    # safetensors for offline LLM.generate({"prompt_embeds": tensor}); otherwise the HTTP body, ready for curl -d @FILE.
    data = pe.safetensors_bytes() if out.suffix == ".safetensors" else json.dumps(pe.completion_body()).encode()
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise RagptError(f"cannot write {out.name}: {e.strerror or e}") from None
    p = pe.prepared
    summary = {"file": str(out), "shape": list(pe.tensor.shape), "dtype": str(pe.tensor.dtype).removeprefix("torch."),
               "soft_prompt_tokens": pe.soft_prompt_tokens, "department": p.department,
               "prompt_version": p.prompt_version, "max_tokens": p.max_new_tokens,
               "stop_token_ids": pe.stop_token_ids, "citations": [asdict(c) for c in p.citations],
               "contract": p.contract.to_dict(), "contract_overrides": p.overrides}
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
        return
    version = p.prompt_version or "no soft prompt"
    typer.echo(f"wrote {out}: {pe.tensor.shape[0]} x {pe.tensor.shape[1]} {summary['dtype']} "
               f"({p.department} {version}: {pe.soft_prompt_tokens} soft-prompt positions + {len(p.ids)} tokens)")
    for i, c in enumerate(p.citations, start=1):
        typer.echo(f"  [{i}] {c.source} #chunk {c.chunk} (score {c.score:.4f}) {c.title}")


def _history_turns(text: str | None) -> tuple:
    from ragpt.serving.request import Turn

    if not text:
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise RagptError(f"--history is not valid JSON ({e.msg})") from None
    ok = isinstance(items, list) and all(isinstance(i, dict) and i.get("role") in ("user", "assistant")
                                         and isinstance(i.get("content"), str) for i in items)
    if not ok:
        raise RagptError('--history must be a JSON list of {"role": "user" | "assistant", "content": "..."}')
    return tuple(Turn(i["role"], i["content"]) for i in items)


@app.command()
def retrieve(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The query.")],
    department: Annotated[str, typer.Option("--department", "-d", help="Department asking.")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index name.")] = "sample",
    k: Annotated[int | None, typer.Option("-k", help="Chunks to retrieve.")] = None,
    source: Annotated[str | None, typer.Option(
        help="Only chunks of documents with this relative path (or trailing part of it) or glob.")] = None,
    title: Annotated[str | None, typer.Option(help="Only chunks of documents with this title.")] = None,
    no_dense: Annotated[bool, typer.Option("--no-dense", help="BM25 only.")] = False,
    no_bm25: Annotated[bool, typer.Option("--no-bm25", help="Dense only.")] = False,
) -> None:
    """Show the chunks a department's question retrieves (no generation)."""
    from ragpt.serving.pipeline import Pipeline

    filters = {k_: v for k_, v in {"source": source, "title": title}.items() if v}
    try:
        s = _settings(ctx, k=k, dense=False if no_dense else None, bm25=False if no_bm25 else None)
        hits = Pipeline.open(index, settings=s).retrieve(question, department, filters=filters)
    except RagptError as e:
        _fail(e)
    for h in hits:
        c = h.chunk
        typer.echo(f"[{h.rank}] {c.source} #chunk {c.chunk} score={h.score:.4f} "
                   f"dense={h.dense_score} bm25={h.bm25_score}")
        typer.echo("    " + c.text[:200].replace("\n", " ") + ("..." if len(c.text) > 200 else ""))


@app.command()
def demo(
    ctx: typer.Context,
    index: Annotated[str, typer.Option("--index", "-i", help="Index to build the sample into.")] = "sample",
    limit: Annotated[int | None, typer.Option(help="Questions per department (default: all).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per answer.")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The main job on the embedded defaults: ingest the sample corpus, answer its questions."""
    from ragpt.cli.demo import run_demo

    try:
        run_demo(_settings(ctx, max_new_tokens=max_tokens), index=index, limit=limit, progress=not quiet)
    except RagptError as e:
        _fail(e)


@app.command()
def train(
    ctx: typer.Context,
    department: Annotated[str, typer.Option("--department", "-d", help="Department whose prompt to train.")],
    data: Annotated[Path, typer.Option(help="QA file: JSONL {question, answers, doc_id?, context?} or SQuAD JSON.")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index the examples retrieve from.")] = "sample",
    dev_data: Annotated[Path | None, typer.Option(help="Dev QA file (default: split --data by document).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = TRAIN_DEFAULTS["steps"],
    batch_size: Annotated[int, typer.Option(help="Examples per step (global).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = TRAIN_DEFAULTS["lr"],
    warmup_steps: Annotated[int | None, typer.Option(
        help="Linear warm-up steps (default: 10% of --steps).")] = None,
    n_tokens: Annotated[int, typer.Option(help="Soft prompt length (virtual tokens).")] = 20,
    depth: Annotated[int, typer.Option(
        min=0,
        help="Decoder layers whose prompt-position inputs are learned: 0 = every layer (a deep prompt, the "
             "default: the best measured recipe), 1 = a plain prompt, N = the first N layers.")
    ] = TRAIN_DEFAULTS["depth"],
    init: Annotated[str, typer.Option(help="Initialisation: text, vocab or random.")] = "text",
    init_text: Annotated[str | None, typer.Option(help="Text for --init text (default: the system prompt).")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Retrieved chunks per example (default: the k setting).")]
    = None,
    gold_context: Annotated[str, typer.Option(
        help="Put the gold passage in the context: never, missed (when retrieval missed the answer), always."
    )] = "never",
    query_adapter: Annotated[bool, typer.Option(
        "--query-adapter/--no-query-adapter",
        help="Also learn a query adapter (a linear map on question embeddings) from the training questions and "
             "retrieve every example with it; kept with the prompt where it finds more answers on held-out "
             "training questions. Helps new questions about the documents the training questions cover, can "
             "hurt on documents none of them is about (docs/results.md).")] = False,
    max_context_tokens: Annotated[int | None, typer.Option(
        help="Prompt token budget (default: the max_context_tokens setting).")] = None,
    eval_every: Annotated[int, typer.Option(help="Dev evaluation every N steps (0: at the end).")] = 20,
    patience: Annotated[int, typer.Option(help="Stop after N evaluations without improvement (0: never).")] = 3,
    dev_fraction: Annotated[float, typer.Option(
        help="Share of --data held out as dev, whole documents (without --dev-data).")
    ] = TRAIN_DEFAULTS["dev_fraction"],
    dev_max: Annotated[int, typer.Option(
        help="At most this many dev questions, spread across documents (seeded).")] = TRAIN_DEFAULTS["dev_max"],
    seed: Annotated[int, typer.Option(help="Random seed (runs are deterministic for a seed).")] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint folder (default: cache_dir/checkpoints/D/<hash of settings, data, index>).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from the checkpoint if present.")] = True,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register the result as a draft.")] = True,
    actor: Annotated[str | None, typer.Option(help="Author recorded in the registry.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a department's soft prompt on QA examples whose context comes from the real retriever.

    Every dev evaluation is compared with no prompt (paired bootstrap interval); the draft is
    registered with its release verdict (better / no better / worse), and `prompts approve`
    refuses a worse one without --force. Runs data-parallel under
    `torchrun --nproc_per_node=N -m ragpt.cli train ...`.
    """
    from ragpt.training.job import run_training
    from ragpt.training.trainer import TrainConfig

    try:
        # The input contract's values come from the settings (one place), these flags overriding them.
        s = _settings(ctx, k=k, max_context_tokens=max_context_tokens)
        cfg = TrainConfig(
            department=department, n_tokens=n_tokens, depth=depth, init=init, init_text=init_text, steps=steps,
            batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, k=s.k,
            max_context_tokens=s.max_context_tokens, max_question_tokens=s.max_question_tokens,
            max_history_tokens=s.max_history_tokens, query_rule=s.query_rule, gold_context=gold_context,
            query_adapter=query_adapter, eval_every=eval_every, patience=patience, dev_fraction=dev_fraction,
            dev_max=dev_max, seed=seed,
            checkpoint_every=max(1, eval_every or 20),
        )
        summary = run_training(
            s, index=index, data=data, cfg=cfg, dev_data=dev_data,
            checkpoint_dir=checkpoint_dir, resume=resume, register=register, actor=actor, progress=not quiet,
        )
    except (RagptError, ValueError) as e:
        _fail(e)
    if summary.get("folder"):
        typer.echo(json.dumps(summary, indent=2))


@index_app.command("info")
def index_info(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Index name.")],
) -> None:
    """Print an index's manifest summary: embedder, counts, departments, documents."""
    from ragpt.retrieval.index import DocumentIndex

    try:
        idx = DocumentIndex.open(_settings(ctx).index_dir, name)
    except RagptError as e:
        _fail(e)
    m = dict(idx.manifest)
    docs = m.pop("documents")
    # The chunking new documents get (older manifests leave the splitter out: recursive).
    typer.echo(json.dumps({**m, "chunking": idx.chunking, "documents": sorted(docs)}, indent=2))


@index_app.command("list")
def index_list(ctx: typer.Context) -> None:
    """List the indexes under index_dir."""
    try:
        root = Path(_settings(ctx).index_dir)
    except RagptError as e:
        _fail(e)
    for p in sorted(root.glob("*/CURRENT")):
        typer.echo(p.parent.name)


@index_app.command("docs")
def index_docs(
    ctx: typer.Context,
    index: Annotated[str, typer.Option("--index", "-i", help="Index name.")],
    department: Annotated[list[str] | None, typer.Option("--department", "-d",
        help="Only documents this department reads; repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List an index's documents: source, departments, chunks, sha256."""
    from ragpt.retrieval.index import DocumentIndex

    try:
        idx = DocumentIndex.open(_settings(ctx).index_dir, index)
    except RagptError as e:
        _fail(e)
    wanted = set(department or ())
    rows = [
        {"id": key, "source": e["source"], "departments": e["departments"], "chunks": e.get("n_chunks", 0),
         "sha256": e["sha256"], "title": e.get("title", "")}
        for key, e in sorted(idx.documents.items(), key=lambda kv: (kv[1]["source"], kv[0]))
        if not wanted or wanted & set(e["departments"])
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for r in rows:
        other_id = f"  (id {r['id']})" if r["id"] != r["source"] else ""
        typer.echo(f"{r['source']}\t{','.join(r['departments'])}\t{r['chunks']} chunks\t"
                   f"sha256:{r['sha256'][:12]}{other_id}")


@index_app.command("delete")
def index_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Index name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete an index and all its snapshots (asks first; without a terminal, needs --yes)."""
    from ragpt.retrieval.index import delete_index, index_folder

    try:
        root = Path(_settings(ctx).index_dir)
        index_folder(root, name)  # an unknown index fails before asking
        if not yes:
            if not sys.stdin.isatty():
                raise RagptError(f"refusing to delete index {name!r} without confirmation: pass --yes")
            if not typer.confirm(f"Delete index {name!r} and all its snapshots?"):
                raise typer.Exit(code=1)
        delete_index(root, name)
    except RagptError as e:
        _fail(e)
    typer.echo(f"deleted index {name}")


@models_app.command("prepare")
def models_prepare(ctx: typer.Context) -> None:
    """Load both models once (converting the embedded GGUF to safetensors if needed)."""
    import time

    from ragpt.lm.models import load_embedder, load_generator_model, resolve_generator_path

    try:
        s = _settings(ctx)
        t = time.perf_counter()
        model, _ = load_generator_model(s)
        typer.echo(f"generator {s.generator}: {resolve_generator_path(s)} "
                   f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
                   f"{time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        e = load_embedder(s)
        typer.echo(f"embedder {e.name}: dim {e.dim}, window {e.max_tokens} ({time.perf_counter() - t:.1f}s)")
    except RagptError as e:
        _fail(e)


def run() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
