"""Evaluation reports people can read: results.json, predictions.jsonl, report.md and PNG plots.

Everything here is a pure function of the results dict (ragpt.evaluation.runner.run_evaluation), so a
run's files are reproducible for a seed; only fields named "latency_ms", "timing" and
"created" measure the machine rather than the method.
"""

from __future__ import annotations

import json
from pathlib import Path

from ragpt.atomic import atomic_write_text

PLOTS = {"scores": "scores.png", "recall": "recall_at_k.png", "loss": "loss_curves.png"}
SCORE_LABELS = {"em": "EM", "f1": "token-F1", "rouge_l": "ROUGE-L", "groundedness": "groundedness"}


def write_report(results: dict, predictions: list[dict], out: Path) -> dict[str, Path]:
    """Write every artifact of a run into `out`; return name -> path of what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "results.json", "predictions": out / "predictions.jsonl", "markdown": out / "report.md"}
    # Insertion order, not sorted keys: departments and methods stay in the order they were evaluated.
    atomic_write_text(written["json"], json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(written["predictions"],
                      "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in predictions))
    written.update(write_plots(results, out))
    atomic_write_text(written["markdown"], render_markdown(results, {k: p.name for k, p in written.items()}))
    return written


# ---------------------------------------------------------------------------- formatting


def fmt_ci(ci: dict | None, digits: int = 1) -> str:
    """'54.3 [48.1, 60.2]' (mean [95% interval]); an en dash when undefined."""
    if not ci or ci.get("mean") is None:
        return "–"
    if ci.get("low") is None:  # run without bootstrap
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def fmt_diff(ci: dict | None) -> str:
    """A paired difference, marked when its interval excludes 0 (the difference is not noise)."""
    if not ci or ci.get("mean") is None:
        return "–"
    if ci.get("low") is None:  # run without bootstrap
        return f"{ci['mean']:+.1f}"
    mark = " ✱" if ci["low"] > 0 or ci["high"] < 0 else ""
    return f"{ci['mean']:+.1f} [{ci['low']:+.1f}, {ci['high']:+.1f}]{mark}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n:,} B)"
    return f"{n} B"


def fmt_ms(lat: dict | None) -> str:
    if not lat or lat.get("p50") is None:
        return "–"
    return f"{lat['p50']:.0f} / {lat['p95']:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return out + [""]


def _method_names(results: dict) -> list[str]:
    names: list[str] = []
    for dept in results["departments"].values():
        names += [m for m in dept["methods"] if m not in names]
    return names


# ---------------------------------------------------------------------------- markdown


def render_markdown(results: dict, files: dict[str, str] | None = None) -> str:
    files = files or {}
    run, cfg, depts = results.get("run", {}), results["config"], results["departments"]
    lines = [f"# Evaluation: {', '.join(depts)} on index `{run.get('index', '?')}`", ""]
    facts = [run.get("created"), f"seed {cfg['seed']}", f"k={cfg['k']} retrieved chunks",
             f"gold context: {cfg['gold_context']}", f"max {cfg['max_new_tokens']} new tokens",
             f"{cfg['n_bootstrap']} bootstrap resamples",
             f"**limit {cfg['limit']} questions per department (seeded sample)**" if cfg.get("limit") else None]
    lines += [" · ".join(f for f in facts if f), ""]
    for note in results.get("notes", []):
        lines.append(f"> **Note:** {note}")
    if results.get("notes"):
        lines.append("")
    lines += _summary(results) + _reading_guide(results) + _hygiene(results) + _methods(results)
    lines += _quality(results, files) + _retrieval(results, files) + _latency(results)
    lines += _losses(results, files) + _provenance(results) + _examples(results)
    return "\n".join(lines).rstrip() + "\n"


def _summary(results: dict) -> list[str]:
    overall = results["overall"]
    rows = []
    for name, m in overall["methods"].items():
        rows.append([name, m["n"], fmt_ci(m["em"]), fmt_ci(m["f1"]), fmt_ci(m["rouge_l"]), fmt_ci(m["groundedness"]),
                     fmt_diff(m.get("vs_none", {}).get("f1")) if "vs_none" in m else "(baseline)"])
    lines = ["## Summary (all departments, every question counted once)", ""]
    lines += _table(["method", "n", "EM", "token-F1", "ROUGE-L", "groundedness", "token-F1 vs none"], rows)
    if len({m["n"] for m in overall["methods"].values()}) > 1:
        lines += ["Some methods ran in some departments only (smaller n): compare their rows through the paired "
                  "*vs none* column, which uses only the questions they answered, or per department below.", ""]
    return lines


def _reading_guide(results: dict) -> list[str]:
    cfg = results["config"]
    lines = ["## How to read this", "",
             "- Scores are percentages: mean over questions [95% interval]. Intervals are percentile bootstrap "
             f"({cfg['n_bootstrap']} resamples of the questions, seed {cfg['seed']}); the same resamples are used "
             "for every method, so intervals are paired.",
             "- *vs none* is the paired difference to the same questions answered without any prompt; ✱ marks a "
             "difference whose interval excludes 0. Overlapping intervals of two methods do not by themselves "
             "mean \"no difference\": read the paired column.",
             "- EM and token-F1 use the SQuAD v1.1 normalisation (case, punctuation, articles, whitespace); "
             "ROUGE-L is the LCS F-measure on the same tokens (it rewards word order, for long answers); "
             "groundedness is the share of answer tokens found in the context the model was given (empty "
             "answers excluded, see their count).",
             "- Every method answers the same token ids, built by the serving template from the serving "
             f"retriever's top {cfg['k']} chunks (`ragpt.training.trainer.build_examples`); greedy decoding.",
             "- *instruction* is a hand-written instruction rendered as a system turn and prepended as the "
             "embeddings of its tokens: exactly equivalent to a hard text prompt at the start of the input "
             "(same embedding rows, same positions), with the serving template unchanged.",
             "- *lora* is an upper-bound reference, not a serving option: a LoRA adapter (q_proj, v_proj) trained "
             "in this run on the department's training data with the same examples and answer-only loss.",
             ""]
    return lines


def _hygiene(results: dict) -> list[str]:
    data = results.get("data", {})
    lines = ["## Split hygiene", ""]
    split = data.get("split")
    lines.append(f"- How the test data was split: {split}" if split else
                 "- How the test data was split: not recorded (no importer summary.json beside the QA file).")
    lines.append("- Checked in code: every test question (normalised, with its document) is looked up in each "
                 "trained method's training questions; an overlap stops the run unless `--allow-overlap`.")
    rows = []
    for d, dept in results["departments"].items():
        docs = dept["hygiene"]["documents"]
        for name, h in dept["hygiene"]["methods"].items():
            if h["status"] == "not trained":
                continue
            status = {"overlap": "**OVERLAP**", "unchecked": "**unchecked**"}.get(h["status"], h["status"])
            rows.append([d, name, status, "–" if h["overlap"] is None else h["overlap"], h.get("source", "")])
        shared = docs["shared_with_training_data"]
        if shared:
            lines.append(f"- {d}: {shared} of {docs['test_documents']} test documents also have training "
                         f"questions (e.g. {docs['examples'][0]}).")
    lines.append("")
    if rows:
        lines += _table(["department", "method", "check", "test questions in training data", "checked against"], rows)
    return lines


def _methods(results: dict) -> list[str]:
    rows = []
    for d, dept in results["departments"].items():
        for name, m in dept["methods"].items():
            info = m["method"]
            det = info.get("details", {})
            if info["kind"] == "soft":
                deep = f" x {det['depth']} layers (deep)" if det.get("depth", 1) > 1 else ""
                what = f"{det.get('version')} ({det.get('state')}), {det.get('n_tokens')} tokens{deep}, sha256 " \
                       f"{str(det.get('sha256'))[:12]}"
            elif info["kind"] == "instruction":
                what = f"{det.get('tokens')} tokens of text: \"{det.get('text')}\""
            elif info["kind"] == "lora":
                s = det.get("settings", {})
                what = f"rank {s.get('rank')}, {s.get('steps')} steps, {det.get('train_examples')} training examples"
            else:
                what = "frozen model, serving template only"
            rows.append([d, name, f"{info['trainable_parameters']:,}", fmt_bytes(info["bytes"]), what])
    lines = ["## Methods: what each department stores", ""]
    return lines + _table(["department", "method", "trainable parameters", "bytes", "what"], rows)


def _quality(results: dict, files: dict) -> list[str]:
    lines = ["## Answer quality by department", ""]
    for d, dept in results["departments"].items():
        lines += [f"### {d} (n={dept['n']})", ""]
        rows = []
        for name, m in dept["methods"].items():
            rows.append([name, fmt_ci(m["em"]), fmt_ci(m["f1"]), fmt_ci(m["rouge_l"]), fmt_ci(m["groundedness"]),
                         fmt_diff(m["vs_none"]["f1"]) if "vs_none" in m else "(baseline)",
                         m["empty_answers"], m["cut_at_max_tokens"]])
        lines += _table(["method", "EM", "token-F1", "ROUGE-L", "groundedness", "token-F1 vs none",
                         "empty answers", f"cut at {results['config']['max_new_tokens']} tokens"], rows)
    if "scores" in files:
        lines += [f"![scores by department and method]({files['scores']})", ""]
    return lines


def _retrieval(results: dict, files: dict) -> list[str]:
    cfg = results["config"]
    k = cfg["k"] or "k"  # None: departments used different k (see each one's contract)
    rows = []
    for d, r in [*results["departments"].items(), ("**overall**", None)]:
        r = results["overall"]["retrieval"] if r is None else r["retrieval"]
        rows.append([d, r["n"], r["n_with_gold_document"], fmt_ci(r["document"]["hit_at_k"]),
                     fmt_ci(r["document"]["mrr"]), fmt_ci(r["answer_span"]["hit_at_k"]),
                     fmt_ci(r["answer_span"]["mrr"])])
    lines = ["## Retrieval", "",
             f"Is the gold document (its doc_id ends the chunk's source path) or a gold answer span in the "
             f"retrieved chunks? Hit@{k} is measured on the {k} chunks the model was given; MRR and the "
             f"recall@k curve on a top-{cfg['depth']} list (a deeper search, whose candidate pool can reorder the "
             "top ranks slightly). Document metrics count only questions whose gold document is in the "
             "department's part of the index.", ""]
    lines += _table(["department", "n", "n with gold doc in index", f"doc hit@{k}", f"doc MRR@{cfg['depth']}",
                     f"span hit@{k}", f"span MRR@{cfg['depth']}"], rows)
    if "recall" in files:
        lines += [f"![recall@k]({files['recall']})", ""]
    return lines


def _latency(results: dict) -> list[str]:
    batch = results["config"]["batch_size"]
    depts = results["departments"]
    rows = [[d, "(retrieval)", fmt_ms(dept["retrieval"].get("latency_ms"))] for d, dept in depts.items()]
    for d, dept in depts.items():
        rows += [[d, name, fmt_ms(m.get("latency_ms"))] for name, m in dept["methods"].items()]
    per = " (per request)" if batch == 1 else "; run with --batch-size 1 for per-request latency"
    lines = ["## Latency (ms, p50 / p95)", "",
             f"Generation latency is the wall time of the generate call that answered a question, {batch} "
             f"question(s) per call{per}. Retrieval is a single-question search including the query embedding. "
             "Machine-dependent: compare methods within one run only.", ""]
    return lines + _table(["department", "method", "p50 / p95"], rows)


def _losses(results: dict, files: dict) -> list[str]:
    curves = results.get("loss_curves") or {}
    if not curves:
        return []
    rows = [[key, len(c), f"{c[0]['loss']:.3f}", f"{c[-1]['loss']:.3f}"] for key, c in curves.items()]
    lines = ["## Training loss", "",
             "Soft prompts: the registry's loss_curve.json of each version; lora: trained in this run.", ""]
    lines += _table(["department/method", "steps", "first loss", "last loss"], rows)
    if "loss" in files:
        lines += [f"![training loss curves]({files['loss']})", ""]
    return lines


def _provenance(results: dict) -> list[str]:
    run, data = results.get("run", {}), results.get("data", {})
    lines = ["## Provenance", ""]
    for key in ("index", "index_manifest_sha256", "base_model_fingerprint", "generator", "embedder", "ragpt_version"):
        if run.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{run[key]}`")
    for f in data.get("test_files", []) + data.get("train_files", []):
        lines.append(f"- {f['role']} file `{f['path']}`: sha256 `{f['sha256']}`")
    for d, dept in results["departments"].items():
        lines.append(f"- {d}: {dept['n']} questions evaluated, examples sha256 `{dept['examples_sha256']}`")
        for name, m in dept["methods"].items():
            det = m["method"]["details"]
            if m["method"]["kind"] == "soft":
                lines.append(f"  - {name}: version {det['version']} ({det['state']}), tensor sha256 `{det['sha256']}`, "
                             f"training data sha256 `{det.get('training_data_sha256')}`")
    return lines + [""]


def _examples(results: dict) -> list[str]:
    lines = ["## Example answers (first questions of each department)", ""]
    for d, dept in results["departments"].items():
        methods = dept["methods"]
        first = next(iter(methods.values()), None)
        if first is None:
            continue
        for i, ex in enumerate(first["examples"][:2]):
            lines.append(f"- **{d}**: {_one_line(ex['question'])} — gold: "
                         f"{' / '.join(_one_line(a) for a in ex['answers'][:2])}")
            for name, m in methods.items():
                if i < len(m["examples"]):
                    e = m["examples"][i]
                    lines.append(f"  - {name} (F1 {100 * e['f1']:.0f}): {_one_line(e['prediction']) or '(empty)'}")
    return lines + [""]


def _one_line(text: str, limit: int = 240) -> str:
    """Model output on one line (a newline would end the markdown list item), shortened."""
    text = " ⏎ ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    # No "Software" (matplotlib version) entry: the same results give the same bytes anywhere.
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    tmp.replace(path)


def write_plots(results: dict, out: Path) -> dict[str, Path]:
    written = {"scores": out / PLOTS["scores"], "recall": out / PLOTS["recall"]}
    plot_scores(results, written["scores"])
    plot_recall(results, written["recall"])
    if results.get("loss_curves"):
        written["loss"] = out / PLOTS["loss"]
        plot_losses(results, written["loss"])
    return written


def plot_scores(results: dict, path: Path) -> None:
    """Grouped bars: departments (+ overall) x methods, one panel per score, 95% intervals as error bars."""
    plt = _pyplot()
    groups = [*results["departments"], "overall"]
    methods = _method_names(results)
    fig, axes = plt.subplots(1, 4, figsize=(4 * (1.2 + 0.5 * len(groups)), 4), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, (metric, label) in zip(axes, SCORE_LABELS.items()):
        for j, name in enumerate(methods):
            xs, means, below, above = [], [], [], []
            for g, group in enumerate(groups):
                src = results["overall"]["methods"] if group == "overall" else results["departments"][group]["methods"]
                ci = src.get(name, {}).get(metric)
                if not ci or ci.get("mean") is None:
                    continue  # the method did not run there (e.g. no active soft prompt)
                xs.append(g + (j - (len(methods) - 1) / 2) * width)
                means.append(ci["mean"])
                below.append(0.0 if ci["low"] is None else ci["mean"] - ci["low"])
                above.append(0.0 if ci["high"] is None else ci["high"] - ci["mean"])
            ax.bar(xs, means, width, yerr=[below, above], capsize=2, label=name, color=f"C{j}")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_title(label)
        ax.set_ylim(0, 102)
    axes[0].set_ylabel("% (mean, 95% CI)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(methods), 6), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room at the top for the legend, clear of the bars
    _save(fig, path)


def plot_recall(results: dict, path: Path) -> None:
    """Recall@k for k = 1..depth: solid by gold document, dashed by answer span; one colour per department."""
    plt = _pyplot()
    depth = results["config"]["depth"]
    ks = list(range(1, depth + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (d, dept) in enumerate([*results["departments"].items(), ("overall", results["overall"])]):
        r = dept["retrieval"]
        for kind, style in (("document", "-"), ("answer_span", "--")):
            ys = r[kind]["recall_at"]
            if any(y is not None for y in ys):
                ax.plot(ks, [float("nan") if y is None else y for y in ys], style, marker=".",
                        color="black" if d == "overall" else f"C{i}", label=f"{d} ({kind.replace('_', ' ')})")
    for k in sorted({dept["retrieval"]["k"] for dept in results["departments"].values()}):
        ax.axvline(k, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("k (retrieved chunks)")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 102)
    ax.set_xticks(ks)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title("Retrieval: gold document / answer span in the top k")
    fig.tight_layout()
    _save(fig, path)


def plot_losses(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, curve in results["loss_curves"].items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("Training loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
