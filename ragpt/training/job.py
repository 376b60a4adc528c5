"""`ragpt train`: load the models and index, run the prompt-tuning loop, register the result.

Kept apart from ragpt.training.trainer (the loop) so that the loop stays free of files and registries.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from pathlib import Path

from ragpt.atomic import atomic_write_json
from ragpt.config import Settings
from ragpt.data.qa import QAExample, examples_sha256, load_qa
from ragpt.lm.generator import resolve_bf16
from ragpt.lm.models import load_embedder, load_generator_model
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import Retriever
from ragpt.training.trainer import (
    TrainConfig,
    TrainResult,
    check_deep_support,
    describe_verdict,
    dist_info,
    init_distributed_from_env,
    release_verdict,
    train_prompt,
)


def default_checkpoint_dir(settings: Settings, department: str, run_key: dict) -> Path:
    """cache_dir/checkpoints/<department>/<run>: one folder per (settings, data, index).

    The same command re-run after a kill finds its checkpoint and resumes; a run with other
    hyperparameters or data gets a folder of its own instead of colliding with the last one.
    """
    digest = hashlib.sha256(json.dumps(run_key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(settings.cache_dir) / "checkpoints" / department / digest[:12]


def save_loss_plot(result: TrainResult, path: Path) -> bool:
    """PNG of the loss curve (and dev F1) if matplotlib is installed; the JSON is always saved."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in result.loss_curve], [p["loss"] for p in result.loss_curve], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    if result.evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in result.evals], [e["f1"] for e in result.evals], "o-", color="C1", label="dev F1")
        ax2.set_ylabel("dev token-F1")
    ax.set_title(f"soft prompt: {result.hyperparameters['department']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def run_training(
    settings: Settings,
    *,
    index: str,
    data: Path,
    cfg: TrainConfig,
    dev_data: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    register: bool = True,
    actor: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train a department prompt; on the main process register it as a draft. Returns a summary."""
    cfg.check()  # bad settings fail before any model, index or data is loaded
    joined = init_distributed_from_env()
    try:
        return _train_and_register(settings, index=index, data=data, cfg=cfg, dev_data=dev_data,
                                   checkpoint_dir=checkpoint_dir, resume=resume, register=register, actor=actor,
                                   progress=progress, log=log)
    finally:
        # Leave the process group before the interpreter exits: a live gloo group's threads,
        # destroyed at exit, abort the process ("terminate called without an active exception").
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_and_register(settings: Settings, *, index: str, data: Path, cfg: TrainConfig, dev_data: Path | None,
                        checkpoint_dir: Path | None, resume: bool, register: bool, actor: str | None,
                        progress: bool, log) -> dict:
    from ragpt.data.datasets import TRAINING_QUESTIONS_META_KEY, question_hashes
    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    rank, world = dist_info()
    qas: list[QAExample] = load_qa(data)
    dev_qas = load_qa(dev_data) if dev_data else None
    # Keep only this department's examples when the file names departments.
    for name, lst in (("data", qas), ("dev data", dev_qas or [])):
        if any(q.department for q in lst):
            lst[:] = [q for q in lst if q.department in (None, cfg.department)]
            if not lst:
                raise ValueError(f"{name}: no examples for department {cfg.department!r}")
    doc_index = DocumentIndex.open(settings.index_dir, index)
    doc_index.check_department(cfg.department)
    embedder = load_embedder(settings)
    # The retrieval mode is the settings'; the prompt records it in its input contract.
    retriever = Retriever(doc_index, embedder, dense=settings.dense, bm25=settings.bm25, rrf_k=settings.rrf_k)
    model, tok = load_generator_model(settings)
    cfg.resolve(model, log)  # depth and warm-up, before they key the checkpoint folder
    if cfg.depth > 1:
        check_deep_support(model, cfg.depth)  # before retrieving for every example
    cfg.bf16 = resolve_bf16(settings.bf16) if cfg.bf16 is None else cfg.bf16
    run_key = {"config": cfg.fingerprint(), "data": examples_sha256(qas),
               "dev_data": examples_sha256(dev_qas) if dev_qas else None, "index": doc_index.manifest_sha256()}
    ckpt = checkpoint_dir or default_checkpoint_dir(settings, cfg.department, run_key)
    result = train_prompt(model, tok, retriever, qas, cfg, checkpoint_dir=ckpt, resume=resume,
                          progress=progress, log=log, dev_qas=dev_qas)
    summary = {"department": cfg.department, "metrics": result.metrics, "version": None, "processes": world}
    if rank != 0:
        return summary
    verdict = result.metrics.get("dev_verdict") or release_verdict(None, result.metrics.get("best_step", 0))
    log(f"[train] release verdict: {describe_verdict(verdict)}")
    if verdict["verdict"] == "worse":
        log("[train] `ragpt prompts approve` refuses this draft unless --force with a --reason")
    prompt = SoftPrompt.create(
        result.prompt,
        department=cfg.department,
        base_fingerprint=base_model_fingerprint(model),
        embedder={"name": embedder.name, "dim": embedder.dim},
        index_manifest_sha256=doc_index.manifest_sha256(),
        training_data_sha256=result.data_sha256,
        hyperparameters=result.hyperparameters,
        contract=result.contract,
        query_adapter=result.query_adapter,
        metrics=result.metrics,
        author=actor or getpass.getuser(),
        # Hashes of the normalised training questions: eval refuses a test set that overlaps them.
        extra={"index": index, "generator": settings.generator, "evals": result.evals,
               TRAINING_QUESTIONS_META_KEY: question_hashes(qas + (dev_qas or []))},
    )
    if register:
        registry = PromptRegistry(Path(settings.prompt_dir))
        version = registry.register(prompt, actor=actor or getpass.getuser(),
                                    reason=f"trained on {Path(data).name}; dev verdict: {verdict['verdict']}")
        folder = Path(settings.prompt_dir) / cfg.department / version
    else:
        folder = ckpt / "result"
        prompt.save(folder)
        version = None
    atomic_write_json(folder / "loss_curve.json", {"loss": result.loss_curve, "evals": result.evals})
    save_loss_plot(result, folder / "loss_curve.png")
    summary.update(version=version, folder=str(folder))
    return summary
