"""Serving throughput: cross-department batching vs one request at a time vs one batch per department.

Builds a 4-department index from the sample corpus (hr, it, finance, and "legal", which shares
four of their documents), registers a random 20-token soft prompt per department in a temporary
registry, then for each batching mode starts `ragpt serve` (uvicorn on 127.0.0.1, its own process)
and drives it with 1, 4 and 16 concurrent closed-loop clients, each request for the next of the
four departments. Reports answers/s and p50/p95 latency, and the soft-prompt overhead: latency
without a soft prompt, with one from the prefix KV cache, and with one run inline (cache off).

    python benchmarks/serve_throughput.py            # writes benchmarks/results/serve_throughput.{json,md}
    python benchmarks/serve_throughput.py --quick    # fewer requests, a smoke run
    python benchmarks/serve_throughput.py --scheduling   # continuous vs static batching -> serve_scheduling.{json,md}

`--scheduling` compares the two schedulers of the service (`[batching] scheduler`): static batching
(a batch runs until its last row finishes) and continuous batching (requests join between decode
steps, prompts run under a per-step token budget) at 4, 16 and 32 clients, and a mixed load in
which one extra client sends near-window prompts: p50/p95 of the short requests with and without it.

Runs on CPU with one torch thread by default (--threads): on a small shared machine a second
OpenMP thread mostly spins waiting for a core, which would flatter batching by slowing the
one-at-a-time baseline. Needs the embedded models (HF_HUB_OFFLINE=1, RAGPT_CACHE_DIR as usual).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ragpt from this checkout when it is not installed

from ragpt.config import load_settings  # noqa: E402
from ragpt.data.ingest import ingest  # noqa: E402
from ragpt.data.sample import SAMPLE_DEPARTMENTS, SAMPLE_DIR, department_dir, sample_questions  # noqa: E402
from ragpt.lm.models import load_embedder, load_generator_model  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint  # noqa: E402
from ragpt.softprompts.registry import PromptRegistry  # noqa: E402
from ragpt_service.auth import hash_api_key  # noqa: E402

DEPARTMENTS = [*SAMPLE_DEPARTMENTS, "legal"]
LEGAL_SHARED = ["hr/code-of-conduct-summary.md", "it/email-retention-policy.html",
                "it/security-incident-reporting.pdf", "finance/vendor-onboarding.md"]
API_KEY = "bench-key"
SOFT_TOKENS = 20
CONCURRENCY = (1, 4, 16)
MODES = {  # name -> [batching] table of the service config
    "cross_department": {"scheduler": "static", "policy": "mixed", "max_batch_size": 16, "max_wait_ms": 10},
    "one_at_a_time": {"scheduler": "static", "policy": "mixed", "max_batch_size": 1, "max_wait_ms": 0},
    "per_department": {"scheduler": "static", "policy": "per_department", "max_batch_size": 16, "max_wait_ms": 10},
}


# ---------------------------------------------------------------------- fixture: index, prompts, questions


def build_fixture(work: Path, chunk_tokens: int, k: int = 1) -> dict[str, list[str]]:
    """Index + registry under `work`; returns questions per department. The prompts' input contract
    says k chunks (served with it)."""
    from ragpt.serving.contract import InputContract

    settings = load_settings(index_dir=work / "indexes", prompt_dir=work / "prompts")
    embedder = load_embedder(settings)
    for dept in SAMPLE_DEPARTMENTS:
        ingest(settings.index_dir, "bench", [department_dir(dept)], [dept], embedder, source_root=SAMPLE_DIR,
               chunk_tokens=chunk_tokens, chunk_overlap=min(settings.chunk_overlap, chunk_tokens // 4), progress=False)
    for rel in LEGAL_SHARED:  # relabel: these documents are readable by their department and legal
        ingest(settings.index_dir, "bench", [SAMPLE_DIR / rel], [rel.split("/")[0], "legal"], embedder,
               source_root=SAMPLE_DIR,
               chunk_tokens=chunk_tokens, chunk_overlap=min(settings.chunk_overlap, chunk_tokens // 4), progress=False)
    model, _ = load_generator_model(settings)
    emb = model.get_input_embeddings().weight
    reg = PromptRegistry(settings.prompt_dir)
    for i, dept in enumerate(DEPARTMENTS):
        t = torch.randn(SOFT_TOKENS, emb.shape[1], generator=torch.Generator().manual_seed(i)) * float(emb.std())
        v = reg.register(SoftPrompt.create(t, department=dept, base_fingerprint=base_model_fingerprint(model),
                                           contract=InputContract(k=k).to_dict()), actor="benchmark")
        reg.approve(dept, v, actor="benchmark")
        reg.activate(dept, v, actor="benchmark")
    questions = {d: [q.question for q in sample_questions(d)] for d in SAMPLE_DEPARTMENTS}
    questions["legal"] = [q.question for q in sample_questions() if q.source in LEGAL_SHARED]
    return questions


def write_config(work: Path, name: str, batching: dict, prefix_cache: bool, max_tokens: int) -> Path:
    lines = ['index = "bench"', "[router]", "enabled = false", "[limits]", f"max_tokens = {max_tokens}",
             "request_timeout_s = 900", "max_message_chars = 60000", "max_request_bytes = 262144", "[batching]",
             *(f"{k} = {json.dumps(v)}" for k, v in batching.items()), f"prefix_cache = {json.dumps(prefix_cache)}",
             "max_queue = 256"]
    for dept in DEPARTMENTS:
        lines += [f"[departments.{dept}]", f'api_keys = ["{hash_api_key(API_KEY)}"]']
    path = work / f"serve-{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = ("from ragpt.cli.main import app; from ragpt.cli.serve import serve\n"
         "if not any(c.callback is serve for c in app.registered_commands): app.command()(serve)\n"
         "app()")


class Server:
    """`ragpt serve` in its own process, stopped on exit."""

    def __init__(self, work: Path, config: Path, threads: int, k: int, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "RAGPT_THREADS": str(threads), "RAGPT_K": str(k), **(env or {})}
        self.log = open(work / f"{config.stem}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--index-dir", str(work / "indexes"), "--prompt-dir", str(work / "prompts"),
             "serve", "--config", str(config), "--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server failed to load: {r.json().get('error')}")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# ---------------------------------------------------------------------- load generation


def plan(questions: dict[str, list[str]], n: int, offset: int = 0) -> list[tuple[str, str]]:
    """n requests cycling over the four departments, each with the next of its questions."""
    out = []
    for i in range(n):
        dept = DEPARTMENTS[(offset + i) % len(DEPARTMENTS)]
        qs = questions[dept]
        out.append((dept, qs[((offset + i) // len(DEPARTMENTS)) % len(qs)]))
    return out


async def drive(url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int,
                prompt_version: str | None = None, extra: dict | None = None) -> dict:
    """Closed-loop clients: each sends its next request as soon as its previous answer arrived."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies: list[float] = []
    records: list[dict] = []
    errors: list[str] = []

    async def client(c: httpx.AsyncClient) -> None:
        while not queue.empty():
            dept, q = queue.get_nowait()
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
            if prompt_version:
                body["prompt_version"] = prompt_version
            body.update(extra or {})
            t0 = time.perf_counter()
            r = await c.post(f"/v1/departments/{dept}/chat", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            latencies.append(dt)
            records.append(r.json())

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(latencies, records, errors, wall, concurrency)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]  # nearest rank


def summarize(latencies, records, errors, wall, concurrency) -> dict:
    def mean(key, sub="usage"):
        vals = [r[sub][key] for r in records]
        return round(statistics.mean(vals), 3) if vals else None

    return {
        "clients": concurrency, "requests": len(latencies) + len(errors), "answers": len(latencies),
        "errors": errors[:5], "wall_s": round(wall, 2),
        "answers_per_s": round(len(latencies) / wall, 3) if wall > 0 else None,
        "p50_latency_s": round(pct(latencies, 50), 3) if latencies else None,
        "p95_latency_s": round(pct(latencies, 95), 3) if latencies else None,
        "mean_prompt_tokens": mean("prompt_tokens"), "mean_completion_tokens": mean("completion_tokens"),
        "mean_batch_size": mean("batch_size", "timings"), "mean_queue_s": mean("queue_s", "timings"),
        "mean_generate_s": mean("generate_s", "timings"),
    }


def overhead(url: str, questions, n: int, max_tokens: int, prompt_version: str | None) -> dict:
    """One client, one request at a time: a full answer, and the first token alone (retrieval + prefill),
    where the soft prompt's extra positions and the prefix cache show most."""
    reqs = plan(questions, n, offset=3)
    full = asyncio.run(drive(url, reqs, 1, max_tokens, prompt_version=prompt_version))
    first = asyncio.run(drive(url, reqs, 1, 1, prompt_version=prompt_version))
    print(f"[bench] overhead prompt_version={prompt_version}: answer p50 {full['p50_latency_s']}s, "
          f"first token p50 {first['p50_latency_s']}s", flush=True)
    return {"answer": full, "first_token": first}


def warm_up(url: str, questions, max_tokens: int) -> None:
    # First calls pay one-off costs (kernel selection, the prefix KV of each prompt version).
    asyncio.run(drive(url, plan(questions, len(DEPARTMENTS), offset=7), 1, max_tokens))
    asyncio.run(drive(url, plan(questions, 8, offset=11), 8, 4))


# ---------------------------------------------------------------------- continuous vs static batching

# name -> ([batching] table, settings given to the server). "static_padded" is static batching on the
# padded engine (rows left-padded, a cache that is concatenated every step): the service before the
# packed engine. "static" is the same scheduler on the packed engine, to tell the engine's gain from
# the scheduler's.
SCHEDULERS = {
    "static_padded": ({"scheduler": "static", "policy": "mixed", "max_batch_size": 16, "max_wait_ms": 10},
                      {"RAGPT_DECODE_ENGINE": "padded"}),
    "static": ({"scheduler": "static", "policy": "mixed", "max_batch_size": 16, "max_wait_ms": 10}, {}),
    "continuous": ({"scheduler": "continuous", "max_batch_size": 16}, {}),  # the defaults otherwise
}
SCHED_CLIENTS = (4, 16, 32)
LONG_TOKENS = 6000  # the near-window client's system text, in generator tokens (the window is 8192)


def long_system_text(target_tokens: int) -> str:
    from ragpt.lm.models import load_generator_model as _load

    _, tok = _load(load_settings())
    sentence = "Read the whole policy text carefully before answering any question about it. "
    n = len(tok(sentence, add_special_tokens=False)["input_ids"])
    return sentence * max(1, target_tokens // n)


async def mixed_load(url: str, short: list[tuple[str, str]], clients: int, max_tokens: int,
                     long_text: str | None) -> dict:
    """`clients` closed-loop short clients; with `long_text`, one more client sends near-window prompts
    until the short ones are done. Reports the short requests only (and the long ones' count)."""
    stop = asyncio.Event()
    long_done: list[float] = []

    async def long_client() -> None:
        body = {"messages": [{"role": "system", "content": long_text},
                             {"role": "user", "content": "Which rules apply?"}],
                "max_tokens": max_tokens, "temperature": 0, "contract": {"max_context_tokens": LONG_TOKENS + 400}}
        async with httpx.AsyncClient(base_url=url, timeout=900,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = await c.post("/v1/departments/hr/chat", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"long request failed: {r.status_code} {r.text[:200]}")
                long_done.append(time.perf_counter() - t0)

    task = asyncio.create_task(long_client()) if long_text else None
    if task:
        await asyncio.sleep(1.0)  # the long prompt is in flight when the short clients start
    res = await drive(url, short, clients, max_tokens)
    stop.set()
    if task:
        await task
    res["long_requests"] = len(long_done)
    res["long_p50_s"] = round(pct(long_done, 50), 3) if long_done else None
    return res


def run_scheduling(args, work: Path, questions) -> dict:
    counts = {4: 8, 16: 32, 32: 64} if not args.quick else {4: 4, 16: 16, 32: 32}
    n_mixed = 32 if not args.quick else 8
    long_text = long_system_text(LONG_TOKENS)
    out: dict = {"throughput": {}, "mixed": {}}
    for name, (batching, env) in SCHEDULERS.items():
        if args.only and name not in args.only:
            continue
        server = Server(work, write_config(work, name, batching, True, args.max_tokens), args.threads, args.k, env)
        try:
            server.wait_ready()
            warm_up(server.url, questions, args.max_tokens)
            out["throughput"][name] = {}
            for c in SCHED_CLIENTS:
                r = asyncio.run(drive(server.url, plan(questions, counts[c]), c, args.max_tokens))
                out["throughput"][name][str(c)] = r
                print(f"[bench] {name:10s} clients={c:2d}: {r['answers_per_s']} answers/s, p50 {r['p50_latency_s']}s,"
                      f" p95 {r['p95_latency_s']}s", flush=True)
            out["mixed"][name] = {}
            for label, text in (("without_long_client", None), ("with_long_client", long_text)):
                r = asyncio.run(mixed_load(server.url, plan(questions, n_mixed, offset=5), 4, args.max_tokens, text))
                out["mixed"][name][label] = r
                print(f"[bench] {name:10s} mixed {label}: short p50 {r['p50_latency_s']}s, p95 {r['p95_latency_s']}s,"
                      f" long requests {r['long_requests']}", flush=True)
        finally:
            server.stop()
    tp, mx = out["throughput"], out["mixed"]
    def at16(name):
        return tp.get(name, {}).get("16", {}).get("answers_per_s")

    for base in ("static_padded", "static"):
        a, b = at16("continuous"), at16(base)
        out[f"continuous_vs_{base}_answers_per_s_at_16"] = round(a / b, 2) if a and b else None
    out["short_p95_with_vs_without_long_client"] = {
        name: (round(m["with_long_client"]["p95_latency_s"] / m["without_long_client"]["p95_latency_s"], 2)
               if m["with_long_client"]["p95_latency_s"] and m["without_long_client"]["p95_latency_s"] else None)
        for name, m in mx.items()}
    return out


def scheduling_markdown(res: dict) -> str:
    cfg = res["config"]
    lines = ["# Continuous vs static batching (benchmarks/serve_throughput.py --scheduling)", "",
             f"Generator {cfg['generator']} on CPU ({cfg['cpus']} cores; load average {cfg['load_avg_start']} at "
             f"start), {cfg['threads']} torch thread(s), bf16 {cfg['bf16']}; {len(DEPARTMENTS)} departments, a "
             f"{SOFT_TOKENS}-token soft prompt each, k={cfg['k']}, max_tokens={cfg['max_tokens']}, greedy, "
             "closed-loop clients cycling over the departments. Static: batches of up to 16 that run until their "
             "last row finishes, on the padded engine (static_padded: the service before the packed engine) and "
             "on the packed engine (static). Continuous: up to 16 running rows on the packed engine, the default "
             "prompt budget per step and long-prompt slowdown.", "",
             "| scheduler | clients | answers | answers/s | p50 s | p95 s | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, levels in res["throughput"].items():
        for c, r in levels.items():
            lines.append(f"| {name} | {c} | {r['answers']} | {r['answers_per_s']} | {r['p50_latency_s']} | "
                         f"{r['p95_latency_s']} | {r['mean_batch_size']} |")
    lines += ["", "At 16 clients continuous batching answers "
              f"**{res.get('continuous_vs_static_padded_answers_per_s_at_16')}x** the answers/s of static batching on "
              f"the padded engine (target: 1.3x) and **{res.get('continuous_vs_static_answers_per_s_at_16')}x** "
              "those of static batching on the packed engine.", "",
              f"## Short requests beside a near-window prompt (4 short clients; one client sending ~{LONG_TOKENS}-"
              "token prompts)", "",
              "| scheduler | load | short answers | short p50 s | short p95 s | long requests done | long p50 s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in res["mixed"].items():
        for label, r in m.items():
            lines.append(f"| {name} | {label.replace('_', ' ')} | {r['answers']} | {r['p50_latency_s']} | "
                         f"{r['p95_latency_s']} | {r['long_requests']} | {r['long_p50_s']} |")
    ratios = res["short_p95_with_vs_without_long_client"]
    lines += ["", "Short-request p95 with the long client / without it: " + ", ".join(
        f"{k} **{v}x**" for k, v in ratios.items()) + " (target for continuous: at most 1.5x).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# Serving throughput (benchmarks/serve_throughput.py)", "",
        f"Generator {cfg['generator']} on CPU ({cfg['cpus']} cores, shared; load average {cfg['load_avg_start']} "
        f"at start), {cfg['threads']} torch thread(s), bf16 {cfg['bf16']}. {len(DEPARTMENTS)} departments "
        f"({', '.join(DEPARTMENTS)}), a {SOFT_TOKENS}-token soft prompt each, k={cfg['k']} chunk of "
        f"{cfg['chunk_tokens']} embedder tokens, max_tokens={cfg['max_tokens']}, greedy. Closed-loop clients; "
        "requests cycle over the departments. Numbers from one run on a shared machine: compare rows, "
        "not absolute values.", "",
        "| mode | clients | requests | answers/s | p50 s | p95 s | mean batch | mean answer tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, levels in res["throughput"].items():
        for c, r in levels.items():
            lines.append(f"| {mode} | {c} | {r['answers']} | {r['answers_per_s']} | {r['p50_latency_s']} | "
                         f"{r['p95_latency_s']} | {r['mean_batch_size']} | {r['mean_completion_tokens']} |")
    sp = res["speedup_at_16_clients"]
    lines += ["", f"At 16 clients cross-department batching answers **{sp['cross_vs_one_at_a_time']}x** the "
              f"answers/s of one request at a time (target: 3x) and {sp['cross_vs_per_department']}x those of one "
              "batch per department.", "",
              "## Soft-prompt overhead (1 client, one request at a time)", "",
              "| variant | requests | answer p50 s | answer p95 s | first token p50 s | first token p95 s "
              "| mean prompt tokens |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in res["soft_prompt_overhead"].items():
        a, f = v["answer"], v["first_token"]
        lines.append(f"| {name} | {a['answers']} | {a['p50_latency_s']} | {a['p95_latency_s']} | "
                     f"{f['p50_latency_s']} | {f['p95_latency_s']} | {a['mean_prompt_tokens']} |")
    lines += ["", "First token: the same requests with max_tokens=1 (retrieval + prefill + one step). Prompt "
              "tokens include the soft prompt's positions; with the prefix cache their KV comes from the cache "
              "instead of being recomputed per request.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few requests: a smoke run")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--chunk-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--scheduling", action="store_true", help="continuous vs static batching only")
    ap.add_argument("--only", nargs="+", choices=list(SCHEDULERS), help="--scheduling: run only these schedulers")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = {1: 2, 4: 4, 16: 16} if args.quick else {1: 4, 4: 8, 16: 16}
    n_overhead = 2 if args.quick else 8
    t_start = time.time()
    load_start = round(os.getloadavg()[0], 2)
    work = Path(tempfile.mkdtemp(prefix="ragpt-bench-"))
    try:
        print(f"[bench] building the 4-department index and prompts in {work}", flush=True)
        questions = build_fixture(work, args.chunk_tokens, args.k)
        if args.scheduling:
            from ragpt.lm.generator import resolve_bf16

            res = run_scheduling(args, work, questions)
            s = load_settings()
            res["config"] = {"generator": s.generator, "threads": args.threads, "bf16": resolve_bf16(s.bf16),
                             "k": args.k, "max_tokens": args.max_tokens,
                             "schedulers": {n: {"batching": b, "env": e} for n, (b, e) in SCHEDULERS.items()},
                             "cpus": os.cpu_count(), "load_avg_start": load_start, "quick": args.quick,
                             "load_avg_end": round(os.getloadavg()[0], 2), "seconds": round(time.time() - t_start, 1)}
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "serve_scheduling.json").write_text(json.dumps(res, indent=2) + "\n")
            (args.out / "serve_scheduling.md").write_text(scheduling_markdown(res))
            print(scheduling_markdown(res))
            return
        results: dict = {"throughput": {}, "soft_prompt_overhead": {}}
        for name, batching in MODES.items():
            server = Server(work, write_config(work, name, batching, True, args.max_tokens), args.threads, args.k)
            try:
                server.wait_ready()
                warm_up(server.url, questions, args.max_tokens)
                results["throughput"][name] = {}
                for c in CONCURRENCY:
                    r = asyncio.run(drive(server.url, plan(questions, counts[c]), c, args.max_tokens))
                    results["throughput"][name][str(c)] = r
                    print(f"[bench] {name:17s} clients={c:2d}: {r['answers_per_s']} answers/s, "
                          f"p50 {r['p50_latency_s']}s, p95 {r['p95_latency_s']}s, batch {r['mean_batch_size']}",
                          flush=True)
                if name == "one_at_a_time":  # soft-prompt overhead: one request at a time, same questions
                    for label, version in (("no_soft_prompt", "none"), ("soft_prompt_prefix_cache", None)):
                        results["soft_prompt_overhead"][label] = overhead(server.url, questions, n_overhead,
                                                                          args.max_tokens, version)
            finally:
                server.stop()
        server = Server(work, write_config(work, "no-prefix-cache", MODES["one_at_a_time"], False, args.max_tokens),
                        args.threads, args.k)
        try:
            server.wait_ready()
            warm_up(server.url, questions, args.max_tokens)
            results["soft_prompt_overhead"]["soft_prompt_no_prefix_cache"] = overhead(
                server.url, questions, n_overhead, args.max_tokens, None)
        finally:
            server.stop()
        tp = results["throughput"]

        def ratio(a: str, b: str) -> float | None:
            x, y = tp[a]["16"]["answers_per_s"], tp[b]["16"]["answers_per_s"]
            return round(x / y, 2) if x and y else None

        results["speedup_at_16_clients"] = {"cross_vs_one_at_a_time": ratio("cross_department", "one_at_a_time"),
                                            "cross_vs_per_department": ratio("cross_department", "per_department")}
        from ragpt.lm.generator import resolve_bf16

        s = load_settings()
        results["config"] = {
            "generator": s.generator, "embedder": s.embedder, "threads": args.threads, "bf16": resolve_bf16(s.bf16),
            "k": args.k, "chunk_tokens": args.chunk_tokens, "max_tokens": args.max_tokens,
            "soft_prompt_tokens": SOFT_TOKENS, "departments": DEPARTMENTS, "requests": counts,
            "modes": MODES, "cpus": os.cpu_count(), "load_avg_start": load_start,
            "load_avg_end": round(os.getloadavg()[0], 2), "quick": args.quick,
            "seconds": round(time.time() - t_start, 1),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "serve_throughput.md").write_text(markdown(results))
        print(markdown(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
