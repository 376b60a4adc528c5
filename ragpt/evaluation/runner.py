"""Offline evaluation: methods x departments on a held-out QA set, scored so that a release
decision can rest on it.

Per department: sample (`limit`, seeded) -> `ragpt.training.trainer.build_examples` (the serving retriever
and the serving template, so a score here is the score the endpoint would get) -> retrieval
metrics -> for each method, greedy answers -> per-question scores -> means with seeded
bootstrap 95% intervals, and paired differences against "none".

Methods see exactly the same token ids; they differ only in what is prepended or in the weights:
  none         the frozen model as served without a soft prompt
  instruction  a hand-written instruction, rendered as a system turn of the model's chat format
               and prepended as the embeddings of its tokens. That is exactly a hard text prefix
               (same embedding rows, same positions 0..n-1, same attention), and it leaves
               ragpt.lm.template's serving format untouched.
  soft:<spec>  a department soft prompt from the registry ("active" or a version)
  lora         a LoRA adapter trained here on the department's training data (upper bound)

Split hygiene is checked, not assumed: a test question (normalised, with its document) that is in
a trained method's training data stops the run (TestSetLeakError) unless explicitly allowed, in
which case the results flag it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ragpt.data.datasets import (
    TRAINING_QUESTIONS_META_KEY,
    document_overlap,
    for_department,
    overlap_check,
    question_key,
    reproduces_training_hash,
)
from ragpt.data.documents import source_matches
from ragpt.data.qa import QAExample, examples_sha256
from ragpt.errors import RagptError
from ragpt.evaluation.metrics import (
    answer_in_text,
    best_over,
    bootstrap_ci,
    exact_match,
    first_relevant_rank,
    groundedness,
    paired_difference_ci,
    percentile,
    recall_at_k,
    reciprocal_rank,
    rouge_l,
    token_f1,
)
from ragpt.lm.generator import Generator
from ragpt.lm.template import ContextPassage
from ragpt.retrieval.search import Retriever
from ragpt.serving.contract import GOLD_CONTEXT_MODES, OVERRIDABLE, InputContract
from ragpt.serving.request import ChatRequest, PreparedRequest, generate_answers
from ragpt.softprompts.registry import PromptRegistry
from ragpt.training.lora import LoraSettings
from ragpt.training.trainer import TrainConfig, TrainExample, build_examples, gold_passage

METHOD_KINDS = ("none", "instruction", "soft", "lora")
SCORES = ("em", "f1", "rouge_l", "groundedness")
DEFAULT_INSTRUCTION = (
    "Answer with the shortest exact phrase from the context that answers the question. "
    "Copy it word for word and add nothing else."
)
RETRIEVAL_BATCH = 64  # build_examples embeds questions 64 at a time; same batches, same vectors


class TestSetLeakError(RagptError):
    """Test questions are in the training data of a method being evaluated."""

    __test__ = False  # not a pytest test class


@dataclass
class EvalConfig:
    # Override the input contract (None: the evaluated prompt version's, as served; else the default).
    k: int | None = None  # chunks in the prompt
    max_context_tokens: int | None = None  # prompt budget
    depth: int = 10  # ranked-list depth for the recall@k curve and MRR
    gold_context: str = "never"  # the test condition: put the gold passage into the context?
    max_new_tokens: int = 48
    batch_size: int = 8  # rows per generate call; latency is per call (1 = per request)
    limit: int | None = None  # questions per department: a seeded sample, file order kept
    seed: int = 0
    n_bootstrap: int = 1000

    def check(self) -> None:
        if self.k is not None and (self.k < 1 or self.depth < self.k):
            raise RagptError(f"need 1 <= k <= depth (k={self.k}, depth={self.depth})")
        if self.gold_context not in GOLD_CONTEXT_MODES:
            raise RagptError(f"gold_context must be one of {GOLD_CONTEXT_MODES}, got {self.gold_context!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.n_bootstrap < 0:
            raise RagptError("batch_size and max_new_tokens must be >= 1, n_bootstrap >= 0")
        if self.limit is not None and self.limit < 1:
            raise RagptError("limit must be >= 1")

    def overrides(self) -> dict:
        return {k: v for k, v in (("k", self.k), ("max_context_tokens", self.max_context_tokens)) if v is not None}

    def train_config(self, department: str, contract: InputContract) -> TrainConfig:
        """Inputs built as the contract builds them, under this evaluation's gold-context condition."""
        return TrainConfig(department=department, k=contract.k, max_context_tokens=contract.max_context_tokens,
                           max_question_tokens=contract.max_question_tokens,
                           max_history_tokens=contract.max_history_tokens, query_rule=contract.query_rule,
                           gold_context=self.gold_context)


@dataclass
class Method:
    name: str
    kind: str
    generator: Generator | None  # None for lora until it is trained
    soft_prompt: torch.Tensor | None = None
    trainable_parameters: int = 0
    bytes: int = 0  # what a department has to store and ship for this method
    details: dict = field(default_factory=dict)
    loss_curve: list[dict] | None = None
    # Question keys of the data the method was trained or selected on; None: not known.
    training_keys: set[str] | None = None
    training_verified: bool = False  # keys provably those of the method's training data
    training_source: str = ""
    query_adapter: Any = None  # a soft version's query adapter (ragpt.retrieval.query_adapter), if it has one

    def describe(self) -> dict:
        return {"kind": self.kind, "trainable_parameters": self.trainable_parameters, "bytes": self.bytes,
                "details": self.details}


@dataclass
class Prepared:
    """One test question with everything that does not depend on the method."""

    qa: QAExample
    example: TrainExample
    context: str  # the passages the model saw, for groundedness
    doc_in_index: bool  # the gold document is readable by the department (doc metrics defined)
    doc_rank: int | None  # rank of the first chunk of the gold document within `depth`
    span_rank: int | None  # rank of the first chunk containing a gold answer within `depth`
    served_doc_hit: bool
    served_span_hit: bool
    retrieve_ms: float


# ---------------------------------------------------------------------------- methods


def instruction_ids(tokenizer, text: str) -> list[int]:
    """The instruction as a system turn of the model's chat format; plain text if it has none."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "system", "content": text}], add_generation_prompt=False,
                                            tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 may return BatchEncoding
            out = out["input_ids"]
        return list(out)
    return tokenizer(text.strip() + "\n\n", add_special_tokens=False)["input_ids"]


def instruction_method(generator: Generator, text: str) -> Method:
    """A hard text prompt delivered as a "soft prompt" made of its own token embeddings."""
    ids = instruction_ids(generator.tokenizer, text)
    if not ids:
        raise RagptError("the instruction tokenizes to nothing")
    weight = generator.embedding.weight
    with torch.no_grad():
        emb = generator.embedding(torch.tensor(ids, device=weight.device)).float().cpu()
    return Method(
        name="instruction", kind="instruction", generator=generator, soft_prompt=emb,
        trainable_parameters=0, bytes=len(text.encode("utf-8")),
        details={"text": text, "tokens": len(ids), "rendered": generator.tokenizer.decode(ids)},
    )


def resolve_soft_specs(registry: PromptRegistry, department: str,
                       specs: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(method name, version) for each spec that applies to the department, and notes on skips.

    Specs: "active", a version ("v3"), or "dept=v3" for one department only.
    """
    out: list[tuple[str, str]] = []
    notes: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        dept, sep, ver = spec.rpartition("=")
        if sep and dept != department:
            continue
        if ver == "active":
            version = registry.active_version(department) if department in registry.departments() else None
            if version is None:
                notes.append(f"{department}: no active soft prompt; soft:active skipped")
                continue
        else:
            version = ver
        if version in seen:
            continue
        seen.add(version)
        out.append((f"soft:{ver}", version))
    return out, notes


def soft_method(registry: PromptRegistry, department: str, name: str, version: str, generator: Generator,
                base_fingerprint: str, train_qas: list[QAExample] | None = None,
                dev_qas: list[QAExample] | None = None) -> Method:
    """A registry version, validated as serving validates it (checksum, shape, base model).

    Its training questions come from its metadata when it stores their hashes, else from
    `train_qas` (+ `dev_qas`), verified against the metadata's training_data_sha256.
    """
    from ragpt.softprompts.artifact import TENSOR_FILE

    sp = registry.load(department, version, base_fingerprint=base_fingerprint, hidden_size=generator.hidden_size,
                       max_depth=generator.max_prompt_depth)
    folder = Path(registry.root) / department / version
    file = folder / TENSOR_FILE
    state = next((r["state"] for r in registry.versions(department) if r["version"] == version), None)
    keys = (sp.meta.get("extra") or {}).get(TRAINING_QUESTIONS_META_KEY)
    hp = sp.meta.get("hyperparameters") or {}
    method = Method(
        name=name, kind="soft", generator=generator, soft_prompt=sp.tensor,
        trainable_parameters=int(sp.tensor.numel()),
        bytes=file.stat().st_size if file.is_file() else 4 * int(sp.tensor.numel()),
        details={
            "version": version, "state": state, "sha256": sp.meta.get("sha256"), "n_tokens": sp.n_tokens,
            "depth": sp.depth,
            "created": sp.meta.get("created"), "author": sp.meta.get("author"),
            "training_data_sha256": sp.meta.get("training_data_sha256"),
            "index_manifest_sha256": sp.meta.get("index_manifest_sha256"),
            "index": (sp.meta.get("extra") or {}).get("index"),
            "hyperparameters": {k: hp.get(k) for k in ("steps", "lr", "n_tokens", "depth", "init", "k", "gold_context",
                                                       "max_context_tokens", "seed", "dev_fraction", "dev_max")
                                if k in hp},
            "training_metrics": sp.meta.get("metrics") or {},
            "contract": InputContract.from_prompt_meta(sp.meta).to_dict(),
            **({"query_adapter_sha256": sp.query_adapter.sha256(),
                "query_adapter_embedder": sp.meta["query_adapter"].get("embedder")}
               if sp.query_adapter is not None else {}),
        },
        loss_curve=_read_loss_curve(folder / "loss_curve.json"),
        training_keys=set(keys) if isinstance(keys, list) else None,
        training_verified=isinstance(keys, list),
        training_source="the prompt's metadata (question hashes)" if isinstance(keys, list) else "",
        query_adapter=sp.query_adapter,
    )
    if method.training_keys is None and train_qas is not None:
        verified = reproduces_training_hash(sp.meta, train_qas, dev_qas)
        method.training_keys = {question_key(q.question, q.doc_id) for q in train_qas + list(dev_qas or [])}
        method.training_verified = verified
        method.training_source = "--train-data" + (
            " (reproduces the prompt's training_data_sha256)" if verified
            else " (does NOT reproduce the prompt's training_data_sha256: the prompt may have seen other data)")
    return method


def _read_loss_curve(path: Path) -> list[dict] | None:
    import json

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("loss") if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- hygiene


def leak_check(test_qas: Sequence[QAExample], method: Method) -> dict:
    """Are any test questions in the method's training data? (normalised question + document)"""
    if method.kind in ("none", "instruction"):
        return {"status": "not trained", "overlap": 0}
    return overlap_check(test_qas, method.training_keys, verified=method.training_verified,
                         source=method.training_source)


# ---------------------------------------------------------------------------- preparation


def group_by_department(qas: list[QAExample], departments: Sequence[str] | None = None) -> dict[str, list[QAExample]]:
    """Questions per department: their own `department`, or the one --department given.

    With `departments`, only those (each must have questions); records naming no department
    need exactly one department to be given, so no question is scored for the wrong department.
    """
    unnamed = [q for q in qas if not q.department]
    if unnamed and (not departments or len(departments) != 1):
        raise RagptError(f"{len(unnamed)} question(s) name no department: give exactly one --department")
    groups: dict[str, list[QAExample]] = {}
    for q in qas:
        groups.setdefault(q.department or departments[0], []).append(q)
    if departments:
        missing = [d for d in departments if d not in groups]
        if missing:
            raise RagptError(f"no questions for department(s) {missing} in the data (found: {sorted(groups)})")
        groups = {d: groups[d] for d in departments}
    return groups


def sample_questions(qas: list[QAExample], limit: int | None, seed: int) -> list[QAExample]:
    """A seeded sample of `limit` questions, in file order (the first N would be a few documents)."""
    if limit is None or limit >= len(qas):
        return list(qas)
    keep = sorted(random.Random(seed).sample(range(len(qas)), limit))
    return [qas[i] for i in keep]


def _served_context(qa: QAExample, example: TrainExample, hits, cfg: EvalConfig, tokenizer) -> str:
    """Text of the passages that made it into the prompt (after gold injection and truncation)."""
    passages = [ContextPassage(h.chunk.text, h.chunk.source, h.chunk.title) for h in hits]
    gold = gold_passage(qa)  # the same rule build_examples applies
    if gold is not None and (cfg.gold_context == "always" or (cfg.gold_context == "missed"
                                                              and not example.retrieval_hit)):
        passages = [gold] + passages[: max(0, cfg.k - 1)]
    prompt = tokenizer.decode(example.prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return "\n\n".join(p.text for p in passages if p.text.strip() in prompt)


def prepare(retriever: Retriever, tokenizer, qas: list[QAExample], department: str, cfg: EvalConfig,
            progress: bool = True, contract: InputContract | None = None, adapter=None) -> list[Prepared]:
    """Build the served inputs and score retrieval; nothing here depends on the method.

    `cfg.k` is the contract's k here (run_evaluation resolves it per department); `adapter` is the
    query adapter of the version whose contract it is, when that contract uses one."""
    contract = contract or InputContract().apply(cfg.overrides())[0]
    examples = build_examples(qas, retriever, tokenizer, cfg.train_config(department, contract), progress,
                              adapter=adapter)
    readable = {c.source for c in retriever.index.chunks.values() if department in c.departments}
    in_index: dict[str, bool] = {}
    out: list[Prepared] = []
    for start in range(0, len(qas), RETRIEVAL_BATCH):
        chunk = qas[start:start + RETRIEVAL_BATCH]
        questions = [ex.query for ex in examples[start:start + RETRIEVAL_BATCH]]  # what the served input searched
        vecs = retriever.embedder.encode(questions) if retriever.dense else None
        if vecs is not None and adapter is not None:
            vecs = adapter.apply(vecs)
        served = retriever.search_many(questions, [department] * len(chunk), cfg.k, query_vectors=vecs)
        deep = served if cfg.depth == cfg.k else retriever.search_many(
            questions, [department] * len(chunk), cfg.depth, query_vectors=vecs)
        for qa, ex, s_hits, d_hits in zip(chunk, examples[start:start + RETRIEVAL_BATCH], served, deep):
            t0 = time.perf_counter()
            retriever.search(ex.query, department, cfg.k)  # timed alone: a request's retrieval latency
            ms = 1000 * (time.perf_counter() - t0)
            if qa.doc_id not in in_index:
                in_index[qa.doc_id] = bool(qa.doc_id) and any(source_matches(s, qa.doc_id) for s in readable)
            has_doc = in_index[qa.doc_id]
            doc_flags = [has_doc and source_matches(h.chunk.source, qa.doc_id) for h in d_hits]
            out.append(Prepared(
                qa=qa, example=ex, context=_served_context(qa, ex, s_hits, cfg, tokenizer),
                doc_in_index=has_doc,
                doc_rank=first_relevant_rank(doc_flags),
                span_rank=first_relevant_rank([answer_in_text(qa.answers, h.chunk.text) for h in d_hits]),
                served_doc_hit=has_doc and any(source_matches(h.chunk.source, qa.doc_id) for h in s_hits),
                served_span_hit=ex.retrieval_hit,  # what build_examples saw: the prompt's passages
                retrieve_ms=ms,
            ))
    return out


# ---------------------------------------------------------------------------- scoring


def score_method(method: Method, prepared: list[Prepared], department: str, cfg: EvalConfig,
                 progress: bool = True, contract: InputContract | None = None) -> list[dict]:
    """Greedy answers for every prepared question, finished by the request path, scored (0-1)."""
    rows: list[dict] = []
    sp = method.soft_prompt
    contract = contract or InputContract()
    bar = tqdm(total=len(prepared), desc=f"eval {department} {method.name}", disable=not progress, leave=False)
    for i in range(0, len(prepared), cfg.batch_size):
        part = prepared[i:i + cfg.batch_size]
        # Soft prompts go through the prefix KV cache, as the serving scheduler sends them.
        requests = [PreparedRequest(
            request=ChatRequest(p.qa.question, department), department=department, prompt_version=method.name,
            soft_prompt=sp, prefix_key=("eval", department, method.name) if sp is not None else None,
            contract=contract, overrides={}, query=p.example.query, hits=list(p.example.hits),
            built=p.example.built, max_new_tokens=cfg.max_new_tokens, temperature=0.0) for p in part]
        t0 = time.perf_counter()
        results = generate_answers(method.generator, requests)
        ms = 1000 * (time.perf_counter() - t0)
        for j, (p, r) in enumerate(zip(part, results)):
            g = groundedness(r.text, p.context)
            rows.append({
                "qid": f"{department}#{i + j}", "department": department, "method": method.name,
                "id": p.qa.id, "doc_id": p.qa.doc_id, "question": p.qa.question, "answers": p.qa.answers,
                "prediction": r.text, "finish_reason": r.finish_reason, "stopped_by": r.stopped_by,
                "completion_tokens": r.usage.get("completion_tokens"),
                "citations": [{"source": c.source, "chunk": c.chunk} for c in r.citations],
                "em": best_over(exact_match, r.text, p.qa.answers),
                "f1": round(best_over(token_f1, r.text, p.qa.answers), 6),
                "rouge_l": round(best_over(rouge_l, r.text, p.qa.answers), 6),
                "groundedness": None if g is None else round(g, 6),
                "latency_ms": round(ms, 2),
            })
        bar.update(len(part))
    bar.close()
    return rows


def _ci(values, cfg: EvalConfig, scale: float = 100.0) -> dict:
    return bootstrap_ci(values, n_resamples=cfg.n_bootstrap, seed=cfg.seed).scaled(scale).to_dict()


def summarise_method(rows: list[dict], baseline: list[dict] | None, cfg: EvalConfig) -> dict:
    """Means (in %) with 95% intervals; paired differences against the baseline's same questions."""
    out: dict = {"n": len(rows)}
    for m in SCORES:
        out[m] = _ci([r[m] for r in rows], cfg)
    if baseline is not None:
        base = {r["qid"]: r for r in baseline}
        pairs = [(r, base[r["qid"]]) for r in rows if r["qid"] in base]
        out["vs_none"] = {
            m: paired_difference_ci([a[m] for a, _ in pairs], [b[m] for _, b in pairs],
                                    n_resamples=cfg.n_bootstrap, seed=cfg.seed).scaled(100).to_dict()
            for m in ("em", "f1", "rouge_l")
        }
    out["empty_answers"] = sum(not r["prediction"].strip() for r in rows)
    out["cut_at_max_tokens"] = sum(r["finish_reason"] == "length" for r in rows)
    out["stopped_looping"] = sum(r.get("stopped_by") == "repetition" for r in rows)
    lat = [r["latency_ms"] for r in rows]
    out["latency_ms"] = {"p50": _round(percentile(lat, 50)), "p95": _round(percentile(lat, 95)),
                         "per": f"generate call of up to {cfg.batch_size} question(s)"}
    return out


def summarise_retrieval(prepared: list[Prepared], cfg: EvalConfig) -> dict:
    """Hit rate at the served k, MRR and the recall@k curve, by gold document and by answer span."""
    with_doc = [p for p in prepared if p.doc_in_index]
    doc_ranks = [p.doc_rank for p in with_doc]
    span_ranks = [p.span_rank for p in prepared]
    lat = [p.retrieve_ms for p in prepared]
    return {
        "n": len(prepared), "n_with_gold_document": len(with_doc), "k": cfg.k, "depth": cfg.depth,
        "document": {
            "hit_at_k": _ci([float(p.served_doc_hit) for p in with_doc], cfg),
            "mrr": _ci([reciprocal_rank(r) for r in doc_ranks], cfg),
            "recall_at": [_round(100 * recall_at_k(doc_ranks, j)) if doc_ranks else None
                          for j in range(1, cfg.depth + 1)],
        },
        "answer_span": {
            "hit_at_k": _ci([float(p.served_span_hit) for p in prepared], cfg),
            "mrr": _ci([reciprocal_rank(r) for r in span_ranks], cfg),
            "recall_at": [_round(100 * recall_at_k(span_ranks, j)) if span_ranks else None
                          for j in range(1, cfg.depth + 1)],
        },
        "latency_ms": {"p50": _round(percentile(lat, 50)), "p95": _round(percentile(lat, 95)),
                       "per": "single-question search (embedding included)"},
    }


def _round(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


# ---------------------------------------------------------------------------- the run


@dataclass
class EvalRun:
    results: dict  # JSON-ready summary (see ragpt.evaluation.report for the layout it renders)
    predictions: list[dict]  # one row per (question, method)


def input_mismatch(method: Method, used: InputContract) -> str | None:
    """How a soft prompt's input contract differs from the inputs of this evaluation (train as you serve)."""
    own = method.details.get("contract")
    if not own:
        return None
    mine = InputContract.from_dict(own)
    diff = {f: {"contract": getattr(mine, f), "used": getattr(used, f)} for f in OVERRIDABLE
            if getattr(mine, f) != getattr(used, f)}
    if not diff:
        return None
    shown = ", ".join(f"{f} {d['contract']} (evaluated with {d['used']})" for f, d in diff.items())
    return f"{method.name} was trained with {shown}"


def department_adapter(plan: Sequence[Method], contract: InputContract, department: str, index=None):
    """The query adapter a department's questions are searched with: that of the first soft method
    (whose contract the evaluation uses), when the contract uses one. Every method is scored on the
    same passages, so soft methods with different adapters cannot share one evaluation; an adapter
    for another embedder than the index's is refused, as serving refuses it."""
    if not contract.query_adapter:
        return None
    soft = [m for m in plan if m.kind == "soft" and m.details.get("contract")]
    with_adapter = {m.query_adapter.sha256(): m.name for m in soft if m.query_adapter is not None}
    if len(with_adapter) > 1:
        raise RagptError(f"{department}: {', '.join(sorted(with_adapter.values()))} search with different query "
                         "adapters, and every method of an evaluation is scored on the same passages; evaluate "
                         "them in separate runs")
    adapter = soft[0].query_adapter if soft else None
    if adapter is not None and index is not None:
        adapter.check_fits(index, soft[0].details.get("query_adapter_embedder"), f"{department} {soft[0].name}")
    return adapter


def department_contract(plan: Sequence[Method], default: InputContract, cfg: EvalConfig,
                        notes: list[str], department: str) -> tuple[InputContract, str]:
    """The contract a department is evaluated with: its first soft method's (what the service applies to
    that version), else `default`; `cfg.k`/`cfg.max_context_tokens` override it. Other soft methods whose
    contracts differ get a note."""
    soft = [m for m in plan if m.kind == "soft" and m.details.get("contract")]
    base, source = (InputContract.from_dict(soft[0].details["contract"]), f"{soft[0].name}'s input contract") \
        if soft else (default, "the default input contract")
    used, diff = base.apply(cfg.overrides())
    if diff:
        source += " with " + ", ".join(f"{f} {d['used']}" for f, d in diff.items())
    for m in soft:
        mismatch = input_mismatch(m, used)
        if mismatch:
            notes.append(f"{department}: {mismatch}; its inputs here differ from those it was trained on")
    return used, source


def _plan_methods(department: str, kinds: Sequence[str], generator: Generator, registry: PromptRegistry | None,
                  specs: Sequence[str], fingerprint: str, instruction: str, train_qas: list[QAExample] | None,
                  dev_qas: list[QAExample] | None, cfg: EvalConfig, notes: list[str]) -> list[Method]:
    """The methods to run for one department, loaded and validated (LoRA is trained later, when its turn comes)."""
    plan: list[Method] = []
    if "none" in kinds:
        plan.append(Method("none", "none", generator))
    if "instruction" in kinds:
        plan.append(instruction_method(generator, instruction))
    if "soft" in kinds:
        resolved, skipped = resolve_soft_specs(registry, department, specs)
        notes.extend(skipped)
        for name, version in resolved:
            plan.append(soft_method(registry, department, name, version, generator, fingerprint, train_qas, dev_qas))
    if "lora" in kinds:
        if not train_qas:
            raise RagptError(f"--train-data has no questions for {department} (needed by the lora method)")
        plan.append(Method("lora", "lora", None,
                           training_keys={question_key(q.question, q.doc_id) for q in train_qas},
                           training_verified=True, training_source="--train-data (trained on it in this run)"))
    return plan


def run_evaluation(
    generator: Generator,
    base_model: torch.nn.Module,
    retriever: Retriever,
    qas_by_department: dict[str, list[QAExample]],
    *,
    methods: Sequence[str] = ("none", "instruction", "soft"),
    prompt_specs: Sequence[str] = ("active",),
    registry: PromptRegistry | None = None,
    train_qas: list[QAExample] | None = None,
    dev_qas: list[QAExample] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    lora: LoraSettings | None = None,
    lora_dir: Path | None = None,
    cfg: EvalConfig | None = None,
    default_contract: InputContract | None = None,
    allow_overlap: bool = False,
    progress: bool = True,
) -> EvalRun:
    """Evaluate every method on every department's questions; refuse on train/test overlap.

    `base_model` is the fp32 model the soft prompts were fingerprinted on (and LoRA copies);
    `generator` may wrap it or its bf16 inference copy. Inputs follow `department_contract`;
    `default_contract` (default: `InputContract()`) is the contract of departments evaluated
    without a soft prompt, e.g. the settings' (`InputContract.from_settings`).
    """
    from ragpt.softprompts.artifact import base_model_fingerprint

    cfg = cfg or EvalConfig()
    cfg.check()
    unknown = [m for m in methods if m not in METHOD_KINDS]
    if unknown:
        raise RagptError(f"unknown method(s) {unknown}; known: {', '.join(METHOD_KINDS)}")
    if "lora" in methods and not train_qas:
        raise RagptError("the lora method trains on --train-data; give it, or drop the method")
    if "soft" in methods and registry is None:
        raise RagptError("the soft method needs a prompt registry")
    if not qas_by_department:
        raise RagptError("no questions to evaluate")
    for d in qas_by_department:
        retriever.index.check_department(d)
    t_start = time.perf_counter()
    fingerprint = base_model_fingerprint(base_model)
    notes: list[str] = []
    sampled = {d: sample_questions(q, cfg.limit, cfg.seed) for d, q in sorted(qas_by_department.items())}
    trains = {d: for_department(train_qas, d) if train_qas else None for d in sampled}
    devs = {d: for_department(dev_qas, d) if dev_qas else None for d in sampled}
    plans = {d: _plan_methods(d, methods, generator, registry, prompt_specs, fingerprint, instruction,
                              trains[d], devs[d], cfg, notes) for d in sampled}
    for d, plan in plans.items():
        for m in plan:
            trained_on = m.details.get("index") if m.kind == "soft" else None
            if trained_on and trained_on != retriever.index.name:
                notes.append(f"{d}: {m.name} was trained against index {trained_on!r} and is evaluated on "
                             f"{retriever.index.name!r}; its passages here may differ from the ones it learned on")

    # Hygiene before any generation: fail fast, never after an hour of decoding.
    hygiene = {d: {"methods": {m.name: leak_check(sampled[d], m) for m in plans[d]},
                   "documents": document_overlap(sampled[d], trains[d], devs[d])} for d in sampled}
    leaks = _refuse_leaks(hygiene, allow_overlap)
    # Every department's contract and query adapter, also before any generation: a conflict in the
    # last department must not surface after the first ones were decoded.
    setups = {d: _department_setup(plans[d], default_contract or InputContract(), cfg, notes, d, retriever.index)
              for d in sampled}

    departments: dict = {}
    predictions: list[dict] = []
    all_prepared: list[Prepared] = []
    rows_by_method: dict[str, list[dict]] = {}
    loss_curves: dict[str, list[dict]] = {}
    bf16_inference = next(generator.model.parameters()).dtype == torch.bfloat16
    for d, qas in sampled.items():
        contract, contract_source, dcfg, adapter = setups[d]
        d_retriever = retriever if (retriever.dense, retriever.bm25, retriever.rrf_k) == (
            contract.dense, contract.bm25, contract.rrf_k) else Retriever(
            retriever.index, retriever.embedder, dense=contract.dense, bm25=contract.bm25, rrf_k=contract.rrf_k)
        prepared = prepare(d_retriever, generator.tokenizer, qas, d, dcfg, progress, contract, adapter)
        all_prepared += prepared
        dept: dict = {"n": len(qas), "examples_sha256": examples_sha256(qas), "contract": contract.to_dict(),
                      "contract_source": contract_source,
                      "retrieval": summarise_retrieval(prepared, dcfg), "methods": {}, "hygiene": hygiene[d]}
        baseline = None
        for m in plans[d]:
            if m.kind == "lora":
                _train_lora_method(m, base_model, generator, d_retriever, trains[d], d, dcfg, contract, lora,
                                   lora_dir, bf16_inference, progress, adapter)
            rows = score_method(m, prepared, d, dcfg, progress, contract)
            if m.kind == "lora":
                m.generator = None  # free the merged copy before the next department
            if m.name == "none":
                baseline = rows
            summary = summarise_method(rows, baseline if m.name != "none" else None, cfg)
            summary["method"] = m.describe()
            summary["examples"] = [{k: r[k] for k in ("question", "answers", "prediction", "f1")} for r in rows[:3]]
            dept["methods"][m.name] = summary
            if m.loss_curve:
                loss_curves[f"{d}/{m.name}"] = m.loss_curve
            predictions += rows
            rows_by_method.setdefault(m.name, []).extend(rows)
        departments[d] = dept

    base_all = rows_by_method.get("none")
    overall = {
        "n": sum(v["n"] for v in departments.values()),
        "retrieval": summarise_retrieval(all_prepared, replace(cfg, k=_config_used(cfg, departments)["k"])),
        "methods": {name: summarise_method(rows, base_all if name != "none" else None, cfg)
                    for name, rows in rows_by_method.items()},
    }
    results = {
        "format": "ragpt.eval", "format_version": 1,
        "run": {"index": retriever.index.name, "index_manifest_sha256": retriever.index.manifest_sha256(),
                "base_model_fingerprint": fingerprint, "embedder": retriever.embedder.name,
                "methods": list(methods), "prompt_specs": list(prompt_specs),
                "instruction": instruction if "instruction" in methods else None,
                "lora": asdict(lora) if (lora is not None and "lora" in methods) else None,
                "allow_overlap": allow_overlap},
        "config": _config_used(cfg, departments),
        "departments": departments,
        "overall": overall,
        "loss_curves": loss_curves,
        "notes": notes + ([f"{len(leaks)} method(s) evaluated despite test/training overlap (--allow-overlap)"]
                          if leaks else []),
        "timing": {"seconds": round(time.perf_counter() - t_start, 1)},
    }
    return EvalRun(results=results, predictions=predictions)


def _department_setup(plan: Sequence[Method], default_contract: InputContract, cfg: EvalConfig,
                      notes: list[str], department: str, index) -> tuple[InputContract, str, EvalConfig, Any]:
    """A department's (contract, where it came from, config with the contract's k and budget,
    query adapter); raises on settings that cannot be evaluated."""
    contract, source = department_contract(plan, default_contract, cfg, notes, department)
    dcfg = replace(cfg, k=contract.k, max_context_tokens=contract.max_context_tokens)
    if dcfg.depth < dcfg.k:
        raise RagptError(f"{department}: need k <= depth (k={dcfg.k} from {source}, depth={dcfg.depth})")
    return contract, source, dcfg, department_adapter(plan, contract, department, index)


def _config_used(cfg: EvalConfig, departments: dict) -> dict:
    """The run's config, with k and the prompt budget as applied (from the contracts) where every
    department used the same; None where they differ (each department's "contract" says)."""
    out = asdict(cfg)
    for name in ("k", "max_context_tokens"):
        used = {d["contract"][name] for d in departments.values()}
        out[name] = used.pop() if len(used) == 1 else None
    return out


def _refuse_leaks(hygiene: dict, allow_overlap: bool) -> list[tuple[str, str, dict]]:
    """The (department, method, check) overlaps; raise TestSetLeakError on any unless allowed."""
    leaks = [(d, name, h) for d, hs in hygiene.items() for name, h in hs["methods"].items()
             if h["status"] == "overlap"]
    if leaks and not allow_overlap:
        d, name, h = leaks[0]
        raise TestSetLeakError(
            f"{h['overlap']} {d} test question(s) are in the training data of {name} ({h['source']}), "
            f"e.g. {h['examples'][0]!r}; evaluate on held-out questions (or pass --allow-overlap to "
            f"report with a warning)")
    return leaks


def _train_lora_method(m: Method, base_model, generator: Generator, retriever: Retriever,
                       train_qas: list[QAExample], department: str, cfg: EvalConfig, contract: InputContract,
                       lora: LoraSettings | None,
                       lora_dir: Path | None, bf16_inference: bool, progress: bool, adapter=None) -> None:
    """Train the LoRA reference on the department's training data, built as the eval's inputs are."""
    from ragpt.training.lora import train_lora

    settings = lora or LoraSettings(seed=cfg.seed)
    examples = build_examples(train_qas, retriever, generator.tokenizer, cfg.train_config(department, contract),
                              progress, adapter=adapter)
    res = train_lora(base_model, examples, settings, out_dir=(lora_dir / department) if lora_dir else None,
                     progress=progress)
    m.generator = Generator(res.model, generator.tokenizer, bf16=bf16_inference)
    m.trainable_parameters = res.trainable_parameters
    m.bytes = res.adapter_bytes
    m.loss_curve = res.loss_curve
    m.details = {"settings": res.settings, "train_examples": res.train_examples, "adapter_dir": res.adapter_dir,
                 "train_data_sha256": examples_sha256(train_qas)}
