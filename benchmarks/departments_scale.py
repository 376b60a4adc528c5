"""A thousand departments: start-up, memory with a bounded prefix cache, cold vs warm requests, listings.

    .venv/bin/python benchmarks/departments_scale.py                  # 1000 departments, label "current"
    .venv/bin/python benchmarks/departments_scale.py --departments 200 --touch 100   # a smaller run
    .venv/bin/python benchmarks/departments_scale.py --label before --code /tmp/ragpt-before  # another checkout

Builds, in a temporary folder, with the code under test:

* an index (`ragpt.data.ingest`, the embedded embedder) of one tiny generated handbook per
  department (`d0000`, `d0001`, ...: a few sentences naming the department, its room and hours);
* a registry with one version per department, registered, approved and activated through
  `PromptRegistry` (so the audit log holds three lines per department). Even departments get a
  plain prompt (20 x 576, 46 KB), odd ones a deep prompt over all 30 layers of SmolLM2-135M
  (30 x 20 x 576, 1.4 MB): the shapes `ragpt train` writes for the embedded generator. The
  tensors are random (seeded; scaled like the input embeddings): serving cost does not depend
  on the values, and no training is needed to measure it;
* a service config (TOML) listing every department with one API key (stored as sha256), a
  metrics key, the router off, and `[batching] prefix_cache_size` where the code has the setting
  (older code: its fixed 64 entries).

Then it starts `ragpt serve` (uvicorn on 127.0.0.1, its own process, one torch thread) and
measures: start-up (process start until /readyz answers 200), the server's RSS, `GET /v1/models`
(5 calls, median), requests for departments whose prompt is cold (first request) and then warm
(second request), with the prefix cache's miss counter read from /metrics around each request,
RSS while touching `--touch` distinct departments (more than the cache holds) one request each,
and `ragpt prompts list` (a fresh process, as a user runs it). Each request asks for one token
(max_tokens 1): retrieval, the prompt and the prefix are what is measured, not decoding.

`--code DIR` runs the server, the CLI and the fixture's registry code from another checkout (e.g.
a `git worktree` of the commit before a fix): results are merged into the same JSON under
`--label`, and the markdown shows every label side by side. Wrap runs in
`flock /tmp/ragpt-bench.lock ...` on a shared machine. Traffic to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_root(argv: list[str]) -> Path:
    """--code must take effect before ragpt is imported, so it is read from argv by hand here."""
    for i, a in enumerate(argv):
        if a == "--code" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if a.startswith("--code="):
            return Path(a.split("=", 1)[1]).resolve()
    return ROOT


def make_shim(code: Path) -> Path:
    """A folder with `ragpt` and `ragpt_service` links into `code`; first on sys.path (and the
    subprocesses' PYTHONPATH) it wins over the editable install, which sits at the end of the path."""
    shim = Path(tempfile.mkdtemp(prefix="ragpt-shim-"))
    (shim / "ragpt").symlink_to(code / "ragpt")
    (shim / "ragpt_service").symlink_to(code / "services")
    return shim


CODE = _code_root(sys.argv)
SHIM = make_shim(CODE)
sys.path.insert(0, str(SHIM))

import httpx  # noqa: E402
import torch  # noqa: E402
from serve_throughput import SERVE, free_port  # noqa: E402  (benchmarks/ is the script's folder)

from ragpt.config import load_settings  # noqa: E402
from ragpt.data.ingest import ingest  # noqa: E402
from ragpt.lm.models import load_embedder, load_generator_model  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint  # noqa: E402
from ragpt.softprompts.registry import PromptRegistry  # noqa: E402
from ragpt_service.auth import hash_api_key  # noqa: E402
from ragpt_service.config import BatchingConfig  # noqa: E402

CMD = ".venv/bin/python benchmarks/departments_scale.py"
API_KEY = "bench-key"
METRICS_KEY = "bench-metrics-key"
SOFT_TOKENS = 20
INDEX = "many"
TOPICS = ["payroll questions", "laptop repairs", "travel bookings", "building access", "parking permits",
          "expense reports", "training courses", "office supplies", "visitor badges", "software licences"]


def dept_name(i: int) -> str:
    return f"d{i:04d}"


def is_deep(i: int) -> bool:
    return i % 2 == 1


def handbook(i: int) -> str:
    d = dept_name(i)
    topic = TOPICS[i % len(TOPICS)]
    return (f"# Department {d} handbook\n\n"
            f"The {d} help desk is in room {100 + i} on floor {i % 12}. It handles {topic} for the whole "
            f"company and answers every ticket within {i % 5 + 1} working days.\n\n"
            f"Opening hours of {d}: Monday to Friday, {7 + i % 3}:00 to {15 + i % 4}:00. Write to "
            f"{d}@example.com; urgent {topic} go to extension {4000 + i}.\n")


def question(i: int, n: int = 0) -> str:
    d = dept_name(i)
    return [f"Where is the {d} help desk?", f"When is {d} open?", f"How fast does {d} answer a ticket?"][n % 3]


# ---------------------------------------------------------------------- fixture


def build_fixture(work: Path, n: int, threads: int) -> dict:
    """Index, registry and timings of building them (the registry through its public API)."""
    torch.set_num_threads(threads)
    settings = load_settings(index_dir=work / "indexes", prompt_dir=work / "prompts")
    docs = work / "docs"
    for i in range(n):
        p = docs / dept_name(i) / "handbook.md"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(handbook(i), encoding="utf-8")
    embedder = load_embedder(settings)
    t0 = time.perf_counter()
    for i in range(n):  # one ingest per department: each department's document is readable by it alone
        ingest(settings.index_dir, INDEX, [docs / dept_name(i)], [dept_name(i)], embedder,
               source_root=docs, chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
               progress=False)
    ingest_s = time.perf_counter() - t0

    model, _ = load_generator_model(settings)
    emb = model.get_input_embeddings().weight
    hidden, layers, scale = int(emb.shape[1]), int(model.config.num_hidden_layers), float(emb.std())
    fp = base_model_fingerprint(model)
    reg = PromptRegistry(settings.prompt_dir)
    per_dept: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        shape = (layers, SOFT_TOKENS, hidden) if is_deep(i) else (SOFT_TOKENS, hidden)
        tensor = torch.randn(*shape, generator=g) * scale
        if is_deep(i):  # deeper layers' inputs are larger than the embeddings (RMS 2-26 on SmolLM2)
            tensor[1:] *= 20.0
        t1 = time.perf_counter()
        d = dept_name(i)
        v = reg.register(SoftPrompt.create(tensor, department=d, base_fingerprint=fp, author="benchmark"),
                         actor="benchmark", reason="departments_scale fixture")
        reg.approve(d, v, actor="benchmark", reason="fixture")
        reg.activate(d, v, actor="benchmark", reason="fixture")
        per_dept.append(time.perf_counter() - t1)
    registry_s = time.perf_counter() - t0
    first, last = per_dept[: max(1, n // 20)], per_dept[-max(1, n // 20):]
    size = sum(f.stat().st_size for f in settings.prompt_dir.rglob("*") if f.is_file())
    return {
        "departments": n, "plain": sum(not is_deep(i) for i in range(n)), "deep": sum(is_deep(i) for i in range(n)),
        "plain_shape": [SOFT_TOKENS, hidden], "deep_shape": [layers, SOFT_TOKENS, hidden],
        "ingest_s": round(ingest_s, 1), "registry_s": round(registry_s, 1),
        "register_approve_activate_ms_first_5pct": round(1000 * statistics.median(first), 1),
        "register_approve_activate_ms_last_5pct": round(1000 * statistics.median(last), 1),
        "registry_mib": round(size / 2**20, 1),
        "audit_lines": sum(1 for _ in (settings.prompt_dir / "audit.jsonl").open()),
    }


def write_config(work: Path, n: int, cache_size: int | None, router: bool = False) -> Path:
    key = hash_api_key(API_KEY)
    lines = [f'index = "{INDEX}"', "[router]", f"enabled = {json.dumps(router)}", "[limits]", "request_timeout_s = 600",
             "[metrics]", f'api_keys = ["{hash_api_key(METRICS_KEY)}"]', "[batching]", "max_queue = 256"]
    if cache_size is not None:
        lines.append(f"prefix_cache_size = {cache_size}")
    for i in range(n):
        lines += [f"[departments.{dept_name(i)}]", f'api_keys = ["{key}"]']
    path = work / f"serve{'-router' if router else ''}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------- server


def sub_env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(SHIM), "OMP_NUM_THREADS": str(threads), "RAGPT_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def rss_mib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return {"rss_mib": round(out.get("VmRSS", 0) / 1024, 1), "peak_rss_mib": round(out.get("VmHWM", 0) / 1024, 1)}


class Server:
    """`ragpt serve` in its own process (cwd: the work folder, so only the shim puts ragpt on the path)."""

    def __init__(self, work: Path, config: Path, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--index-dir", str(work / "indexes"), "--prompt-dir", str(work / "prompts"),
             "serve", "--config", str(config), "--port", str(self.port), "--log-level", "warning"],
            cwd=work, env=sub_env(threads), stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> dict:
        """Seconds until the port answered (/healthz) and until /readyz said ready."""
        port_open = None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                port_open = port_open or time.perf_counter() - self.t0
                if r.status_code == 200:
                    return {"port_open_s": round(port_open, 2), "ready_s": round(time.perf_counter() - self.t0, 2)}
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server failed to load: {r.text[:300]}")
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def cache_counters(c: httpx.Client) -> dict:
    r = c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        for name in ("hits", "misses", "entries"):
            prefix = f"ragpt_prefix_cache_{name}{'' if name == 'entries' else '_total'} "
            if line.startswith(prefix):
                out[name] = int(float(line.split()[1]))
    return out


def ask(c: httpx.Client, i: int, n: int = 0) -> float:
    body = {"messages": [{"role": "user", "content": question(i, n)}], "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    r = c.post(f"/v1/departments/{dept_name(i)}/chat", json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{dept_name(i)}: {r.status_code} {r.text[:300]}")
    return dt


def measure_server(work: Path, n: int, args, cache_size: int | None) -> dict:
    server = Server(work, write_config(work, n, cache_size), args.threads)
    res: dict = {}
    try:
        res["startup"] = server.wait_ready()
        pid = server.proc.pid
        res["rss_ready"] = rss_mib(pid)
        print(f"[scale] ready in {res['startup']['ready_s']} s, RSS {res['rss_ready']['rss_mib']} MiB", flush=True)
        with httpx.Client(base_url=server.url, timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            times, count = [], None
            for _ in range(5):
                t0 = time.perf_counter()
                r = c.get("/v1/models")
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
                data = r.json()["data"]
                count = len(data)
                active = sum(1 for m in data if m.get("active_prompt_version"))
            res["models"] = {"median_s": round(statistics.median(times), 4), "first_s": round(times[0], 4),
                             "models_listed": count, "with_active_prompt": active}
            print(f"[scale] /v1/models: {res['models']}", flush=True)
            ask(c, 0, 1)  # a first request pays one-off costs (kernels, tokenizer); not a cold prompt measurement
            ask(c, 0, 2)
            # Cold vs warm: departments not touched yet, one request each twice; misses read around each.
            cold = {"plain": [], "deep": []}
            warm = {"plain": [], "deep": []}
            misses = {"cold": [], "warm": []}
            picks = [i for i in range(2, n) if i % max(1, n // (2 * args.cold)) in (0, 1)][: 2 * args.cold]
            for i in picks:
                kind = "deep" if is_deep(i) else "plain"
                m0 = cache_counters(c)["misses"]
                cold[kind].append(ask(c, i, 0))
                m1 = cache_counters(c)["misses"]
                warm[kind].append(ask(c, i, 1))
                m2 = cache_counters(c)["misses"]
                misses["cold"].append(m1 - m0)
                misses["warm"].append(m2 - m1)
            res["cold_vs_warm"] = {
                kind: {"n": len(cold[kind]), "cold_median_s": round(statistics.median(cold[kind]), 3),
                       "warm_median_s": round(statistics.median(warm[kind]), 3)} for kind in cold if cold[kind]}
            res["cold_vs_warm"]["prefix_misses_per_cold_request"] = sorted(set(misses["cold"]))
            res["cold_vs_warm"]["prefix_misses_per_warm_request"] = sorted(set(misses["warm"]))
            print(f"[scale] cold vs warm: {res['cold_vs_warm']}", flush=True)
            # Memory: touch many departments once each (more than the cache holds), RSS as it goes.
            touched = [i for i in range(n) if i not in picks and i != 0][: args.touch]
            series = []
            t0 = time.perf_counter()
            for j, i in enumerate(touched, 1):
                ask(c, i, 0)
                if j % args.sample_every == 0 or j == len(touched):
                    series.append({"touched": j, **rss_mib(pid), **cache_counters(c)})
            wall = time.perf_counter() - t0
            res["touch"] = {"departments": len(touched), "wall_s": round(wall, 1),
                            "mean_request_s": round(wall / max(1, len(touched)), 3), "series": series}
            print(f"[scale] touched {len(touched)}: RSS {[s['rss_mib'] for s in series]}", flush=True)
            res["rss_end"] = rss_mib(pid)
    finally:
        server.stop()
    return res


def measure_router_startup(work: Path, n: int, args, cache_size: int | None) -> dict:
    """Start-up with `auto` routing on (the default): the router reads every department's chunk
    vectors from FAISS at start-up. One `auto` request, then stop."""
    server = Server(work, write_config(work, n, cache_size, router=True), args.threads)
    try:
        res = {"startup": server.wait_ready(), "rss_ready": rss_mib(server.proc.pid)}
        with httpx.Client(base_url=server.url, timeout=600, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            body = {"model": "auto", "messages": [{"role": "user", "content": question(7)}], "max_tokens": 1}
            times, routed = [], None
            for _ in range(3):
                t0 = time.perf_counter()
                r = c.post("/v1/chat/completions", json=body)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
                routed = r.json()["department"]
        res["auto_request_median_s"] = round(statistics.median(times), 3)
        res["auto_routed_to"] = routed
        print(f"[scale] with the router: {res}", flush=True)
        return res
    finally:
        server.stop()


def measure_list(work: Path, n: int, threads: int) -> dict:
    out = {}
    for label, extra in (("text", []), ("json", ["--json"])):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "ragpt.cli", "--prompt-dir", str(work / "prompts"),
                                "prompts", "list", *extra], cwd=work, env=sub_env(threads),
                               capture_output=True, text=True, timeout=600)
            times.append(time.perf_counter() - t0)
            if p.returncode != 0:
                raise RuntimeError(f"prompts list failed: {p.stderr[-500:]}")
        rows = len(json.loads(p.stdout)) if extra else len(p.stdout.splitlines())
        out[label] = {"median_s": round(statistics.median(times), 3), "rows": rows}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ragpt.cli.main"], cwd=work, env=sub_env(threads), check=True)
    out["cli_import_s"] = round(time.perf_counter() - t0, 3)  # what any ragpt command pays before it starts
    print(f"[scale] prompts list: {out}", flush=True)
    return out


# ---------------------------------------------------------------------- report


ROWS = [  # (label, path into a run's results, unit)
    ("departments (plain + deep)", ("fixture", "departments"), ""),
    ("build: ingest, one call per department", ("fixture", "ingest_s"), "s"),
    ("build: register + approve + activate all", ("fixture", "registry_s"), "s"),
    ("build: one department's 3 registry changes, first 5%", ("fixture", "register_approve_activate_ms_first_5pct"),
     "ms"),
    ("build: one department's 3 registry changes, last 5%", ("fixture", "register_approve_activate_ms_last_5pct"),
     "ms"),
    ("prefix cache size", ("prefix_cache_size",), ""),
    ("start-up: process start to port open", ("server", "startup", "port_open_s"), "s"),
    ("start-up: process start to /readyz 200 (target < 30 s)", ("server", "startup", "ready_s"), "s"),
    ("RSS when ready", ("server", "rss_ready", "rss_mib"), "MiB"),
    ("GET /v1/models, median of 5", ("server", "models", "median_s"), "s"),
    ("GET /v1/models, models listed", ("server", "models", "models_listed"), ""),
    ("plain prompt: cold request, median", ("server", "cold_vs_warm", "plain", "cold_median_s"), "s"),
    ("plain prompt: warm request, median", ("server", "cold_vs_warm", "plain", "warm_median_s"), "s"),
    ("deep prompt: cold request, median", ("server", "cold_vs_warm", "deep", "cold_median_s"), "s"),
    ("deep prompt: warm request, median", ("server", "cold_vs_warm", "deep", "warm_median_s"), "s"),
    ("prefix misses per cold request (target: 1)", ("server", "cold_vs_warm", "prefix_misses_per_cold_request"), ""),
    ("prefix misses per warm request (target: 0)", ("server", "cold_vs_warm", "prefix_misses_per_warm_request"), ""),
    ("departments touched once each", ("server", "touch", "departments"), ""),
    ("mean request while touching", ("server", "touch", "mean_request_s"), "s"),
    ("with `auto` routing on: process start to /readyz 200", ("router", "startup", "ready_s"), "s"),
    ("with `auto` routing on: an `auto` request, median of 3", ("router", "auto_request_median_s"), "s"),
    ("`ragpt prompts list`, median of 3", ("prompts_list", "text", "median_s"), "s"),
    ("`ragpt prompts list --json`, median of 3", ("prompts_list", "json", "median_s"), "s"),
    ("`ragpt prompts list` rows", ("prompts_list", "text", "rows"), ""),
    ("`import ragpt.cli.main` alone (every command pays it)", ("prompts_list", "cli_import_s"), "s"),
]


def _get(d: dict, path: tuple):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def markdown(all_runs: dict) -> str:
    labels = list(all_runs)
    lines = ["# A thousand departments (benchmarks/departments_scale.py)", "",
             f"Rerun: `flock /tmp/ragpt-bench.lock {CMD}` (`--label before --code DIR` for another checkout)", ""]
    for label in labels:
        r = all_runs[label]
        lines.append(f"* **{label}**: {r['description']}")
    lines += ["", "| measurement | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, path, unit in ROWS:
        vals = []
        for label in labels:
            v = _get(all_runs[label], path)
            vals.append("-" if v is None else f"{v}{(' ' + unit) if unit else ''}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    lines += ["", "## RSS while touching departments (one request each)", ""]
    for label in labels:
        series = _get(all_runs[label], ("server", "touch", "series")) or []
        if not series:
            continue
        lines += [f"**{label}** (prefix cache size {all_runs[label].get('prefix_cache_size')}):", "",
                  "| departments touched | RSS MiB | cache entries | misses |", "|---:|---:|---:|---:|"]
        lines += [f"| {s['touched']} | {s['rss_mib']} | {s.get('entries')} | {s.get('misses')} |" for s in series]
        growth = _get(all_runs[label], ("server", "rss_growth_after_cache_full_mib"))
        lines += ["", f"RSS growth from the first sample with a full cache to the last: {growth} MiB", ""]
    lines += ["## Reading it", "", *READING]
    notes = [f"{label}: {r['notes']}" for label, r in all_runs.items() if r.get("notes")]
    for label, r in all_runs.items():
        lines.append(f"* {label}: load average {r.get('load_average_at_start')} at start, {r.get('threads')} torch "
                     f"thread(s), run wall {r.get('wall_s')} s.")
    lines += [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


READING = [
    "* Targets: start-up under 30 s (met before and after: models load in ~4 s, and nothing per department is "
    "loaded or verified at start-up); a cold department adds one prefix computation to its first request "
    "(met before and after, read from the cache's miss counter: 1 miss for a cold request, 0 for a warm one); "
    "RSS flat once the cache is full (before: +142 MiB over 180 more departments, ~0.8 MiB each, every loaded "
    "prompt tensor kept by `Pipeline`; after: the service holds at most `prefix_cache_size` tensors and "
    "prefixes, +20 MiB, most of it in the first 20 departments after the cache filled, then ~1 MiB per 20).",
    "* What remains after the fix (~85 KiB per department touched, shrinking as it goes) is far below a prompt's "
    "size (46 KiB plain, 1.4 MiB deep, half of each); likely per-department state elsewhere in the process "
    "(metric label sets, retrieval's per-department caches) and the allocator. Not measured apart here.",
    "* `GET /v1/models` reads the replayed audit log instead of every version's meta.json (3.9x faster at 1000 "
    "departments); `ragpt prompts list` no longer imports torch to read meta.json (5.3x; most of what is left is "
    "the CLI's import); a registry change parses only the log lines appended since the last read and cleans only "
    "its own department's folder, so one department's three changes cost 15 ms instead of 103 ms at 1000 "
    "departments (they grew with the log and with the number of folders).",
    "* Prompts are random tensors of the shapes `ragpt train` writes for SmolLM2-135M (plain 20 x 576, deep 30 x "
    "20 x 576); the values do not change what is measured. One run each on a 2-core machine shared with other "
    "work: differences of a few percent in latencies are noise.",
    "* The `before` run predates the `auto` routing phase (its rows show -).",
]


def growth_after_full(series: list[dict], cache_size: int) -> float | None:
    full = [s for s in series if s.get("entries", 0) >= cache_size]
    return round(full[-1]["rss_mib"] - full[0]["rss_mib"], 1) if len(full) >= 2 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--departments", type=int, default=1000)
    ap.add_argument("--cache-size", type=int, default=64, help="[batching] prefix_cache_size, where the code has it")
    ap.add_argument("--touch", type=int, default=240, help="distinct departments touched for the memory series")
    ap.add_argument("--sample-every", type=int, default=20)
    ap.add_argument("--cold", type=int, default=4, help="cold/warm pairs per prompt kind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="current")
    ap.add_argument("--description", default=None, help="what this label's code is (shown in the markdown)")
    ap.add_argument("--notes", default=None)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout to run (default: this one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON, run nothing")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:
        runs = json.loads((args.out / "departments_scale.json").read_text())["runs"]
        (args.out / "departments_scale.md").write_text(markdown(runs))
        return
    has_setting = "prefix_cache_size" in BatchingConfig.model_fields
    cache_size = args.cache_size if has_setting else None
    work = Path(tempfile.mkdtemp(prefix="ragpt-scale-"))
    t_start, load_start = time.time(), round(os.getloadavg()[0], 2)
    try:
        print(f"[scale] code {CODE}; building {args.departments} departments in {work}", flush=True)
        fixture = build_fixture(work, args.departments, args.threads)
        print(f"[scale] fixture: {fixture}", flush=True)
        server = measure_server(work, args.departments, args, cache_size)
        effective = cache_size or 64  # the code without the setting has a fixed 64
        server["rss_growth_after_cache_full_mib"] = growth_after_full(server["touch"]["series"], effective)
        router = measure_router_startup(work, args.departments, args, cache_size)
        listing = measure_list(work, args.departments, args.threads)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[scale] kept {work}", flush=True)
    commit = subprocess.run(["git", "-C", str(CODE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    run = {
        "description": args.description or f"code at {CODE} (HEAD {commit})",
        "code": str(CODE), "commit": commit, "prefix_cache_size": cache_size or 64,
        "prefix_cache_size_setting": has_setting, "threads": args.threads,
        "load_average_at_start": load_start, "wall_s": round(time.time() - t_start, 1),
        "fixture": fixture, "server": server, "router": router, "prompts_list": listing,
        "notes": args.notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "departments_scale.json"
    all_runs = json.loads(path.read_text()) if path.exists() else {}
    all_runs = all_runs.get("runs", {})
    all_runs[args.label] = run
    path.write_text(json.dumps({"benchmark": "departments_scale", "runs": all_runs}, indent=2) + "\n")
    (args.out / "departments_scale.md").write_text(markdown(all_runs))
    print(f"[scale] wrote {path} and departments_scale.md", flush=True)


if __name__ == "__main__":
    main()
