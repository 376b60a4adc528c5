"""Serving under load: 32 closed-loop clients for 60 s, then a burst of 200 requests at once.

    .venv/bin/python benchmarks/serve_load.py      # writes benchmarks/results/serve_load.{json,md}

Reuses serve_throughput.py's fixture (4 departments, a 20-token soft prompt each), config layout,
server process and request plan. The service runs the continuous scheduler with its default
batching settings and `[limits] request_timeout_s = 60`, so admission (503 `overloaded` with a
Retry-After when a request is not expected to finish in its timeout) matters.

1. Closed loop: 32 clients send requests (cycling over the departments, max_tokens 32) for 60 s;
   then the run waits at most 120 s more for answers in flight. A client that gets a 503 sleeps its
   Retry-After (bounded by the 60 s window) before its next request. Reports answers/s, p50/p95 of
   the 200s, counts per status, the Retry-After values of the 503s and the server's RSS before/after.
2. Burst: 200 requests at once (one connection each, httpx limit 200, 120 s client timeout):
   counts per status, p50/p95 of the 200s, Retry-After min/median/max, time to the 503s, RSS after.
   Three probe requests, sent at first-503 + the min / median / max Retry-After, check whether a
   request sent when the service said to retry is taken (200) or refused again.

One torch thread by default (--threads), as serve_throughput.py. Traffic to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_throughput as st  # noqa: E402

ROOT = st.ROOT
CMD = ".venv/bin/python benchmarks/serve_load.py"
BATCHING = {"scheduler": "continuous"}  # the defaults otherwise
TIMEOUT_S = 60


def rss_kib(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return {"rss_mib": round(out.get("VmRSS", 0) / 1024, 1), "peak_rss_mib": round(out.get("VmHWM", 0) / 1024, 1)}


def r3(x):
    return round(x, 3) if x is not None else None


def summary(recs: list[dict], wall: float | None = None) -> dict:
    """recs: {status, latency_s, retry_after} per request (status 'timeout'/'error:...' for client side)."""
    counts: dict[str, int] = {}
    for r in recs:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    ok = [r["latency_s"] for r in recs if r["status"] == 200]
    s503 = [r for r in recs if r["status"] == 503]
    ra = [r["retry_after"] for r in s503 if r["retry_after"] is not None]
    t503 = [r["latency_s"] for r in s503]
    out = {
        "requests": len(recs), "status_counts": dict(sorted(counts.items())), "answers": len(ok),
        "p50_latency_s": r3(st.pct(ok, 50)), "p95_latency_s": r3(st.pct(ok, 95)),
        "max_latency_s": r3(max(ok, default=None)),
        "retry_after_s": ({"n": len(ra), "min": min(ra), "median": statistics.median(ra), "max": max(ra)}
                          if ra else None),
        "time_to_503_s": ({"p50": r3(st.pct(t503, 50)), "p95": r3(st.pct(t503, 95)), "max": r3(max(t503))}
                          if t503 else None),
        "503_codes": sorted({r.get("code") for r in s503 if r.get("code")}),
        "sample_errors": sorted({r["detail"] for r in recs if r["status"] != 200 and r.get("detail")})[:5],
    }
    if wall is not None:
        out["wall_s"] = round(wall, 2)
        out["answers_per_s"] = round(len(ok) / wall, 3) if wall > 0 else None
    return out


async def one(c: httpx.AsyncClient, dept: str, q: str, max_tokens: int, t_origin: float) -> dict:
    body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    rec: dict = {"dept": dept, "sent_at_s": round(t0 - t_origin, 3)}
    try:
        r = await c.post(f"/v1/departments/{dept}/chat", json=body)
    except httpx.TimeoutException:
        rec.update(status="client_timeout", latency_s=time.perf_counter() - t0, retry_after=None)
        return rec
    except httpx.HTTPError as e:
        rec.update(status=f"error:{type(e).__name__}", latency_s=time.perf_counter() - t0, retry_after=None,
                   detail=str(e)[:120])
        return rec
    rec["latency_s"] = time.perf_counter() - t0
    rec["done_at_s"] = round(time.perf_counter() - t_origin, 3)
    rec["status"] = r.status_code
    ra = r.headers.get("retry-after")
    rec["retry_after"] = int(ra) if ra and ra.isdigit() else None
    if r.status_code != 200:
        try:
            err = r.json().get("error", {})
            rec["code"] = err.get("code") if isinstance(err, dict) else None
            msg = err.get("message") if isinstance(err, dict) else str(err)
        except ValueError:
            msg = r.text
        rec["detail"] = f"{r.status_code}: {str(msg)[:160]}"
    return rec


async def closed_loop(url: str, questions, clients: int, duration_s: float, drain_s: float, max_tokens: int) -> dict:
    reqs = st.plan(questions, 100000)
    nxt = iter(reqs)
    recs: list[dict] = []
    t_origin = time.perf_counter()
    stop_at = t_origin + duration_s

    async def client(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            dept, q = next(nxt)
            rec = await one(c, dept, q, max_tokens, t_origin)
            recs.append(rec)
            if rec["status"] == 503 and rec["retry_after"]:  # a polite client honours Retry-After
                await asyncio.sleep(max(0.0, min(rec["retry_after"], stop_at - time.perf_counter())))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=duration_s + drain_s, limits=limits,
                                 headers={"Authorization": f"Bearer {st.API_KEY}"}) as c:
        tasks = [asyncio.create_task(client(c)) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + drain_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t_origin
    res = summary(recs, wall)
    res.update(clients=clients, duration_s=duration_s, unfinished_at_drain_deadline=len(pending),
               answers_in_window=sum(1 for r in recs if r["status"] == 200 and r["done_at_s"] <= duration_s))
    res["answers_per_s_in_window"] = round(res["answers_in_window"] / duration_s, 3)
    return res


async def burst(url: str, questions, n: int, timeout_s: float, max_tokens: int) -> dict:
    reqs = st.plan(questions, n, offset=1)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits,
                                 headers={"Authorization": f"Bearer {st.API_KEY}"}) as c:
        t_origin = time.perf_counter()
        tasks = [asyncio.create_task(one(c, d, q, max_tokens, t_origin)) for d, q in reqs]

        async def probes() -> list[dict]:
            await asyncio.sleep(3.0)  # the 503s come back first
            got = [t.result() for t in tasks if t.done() and t.result()["status"] == 503]
            ra = sorted(r["retry_after"] for r in got if r["retry_after"] is not None)
            if not ra:
                return []
            first = min(r["done_at_s"] for r in got)
            out = []
            for label, wait in (("min", ra[0]), ("median", statistics.median(ra)), ("max", ra[-1])):
                at = first + wait
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t_origin)))
                dept, q = st.plan(questions, 1, offset=7 + len(out))[0]
                async with httpx.AsyncClient(base_url=url, timeout=timeout_s,
                                             headers={"Authorization": f"Bearer {st.API_KEY}"}) as pc:
                    rec = await one(pc, dept, q, max_tokens, t_origin)
                rec.update(label=label, retry_after_used=wait, latency_s=r3(rec["latency_s"]))
                rec.pop("detail", None) if rec["status"] == 200 else None
                out.append(rec)
            return out

        probe_task = asyncio.create_task(probes())
        recs = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_origin
        probe_recs = await probe_task
    res = summary(list(recs), wall)
    ok_done = sorted(r["done_at_s"] for r in recs if r["status"] == 200)
    res.update(burst=n, client_timeout_s=timeout_s, last_200_done_at_s=ok_done[-1] if ok_done else None,
               probes=probe_recs)
    return res


def markdown(res: dict) -> str:
    cfg, cl, b = res["config"], res["closed_loop"], res["burst"]

    def ra(x):
        r = x["retry_after_s"]
        return f"{r['min']} / {r['median']} / {r['max']} (n={r['n']})" if r else "-"

    def t5(x):
        t = x["time_to_503_s"]
        return f"{t['p50']} / {t['p95']} / {t['max']}" if t else "-"

    def counts(x):
        return ", ".join(f"{k}: {v}" for k, v in x["status_counts"].items())

    lines = [
        "# Serving under load (benchmarks/serve_load.py)", "", f"Rerun: `{CMD}`", "",
        f"Generator {cfg['generator']} on CPU ({cfg['cpus']} cores; load average {cfg['load_avg_start']} at start), "
        f"{cfg['threads']} torch thread(s); continuous scheduler with default batching (max_batch_size "
        f"{cfg['max_batch_size']}), max_queue {cfg['max_queue']}, request_timeout_s {cfg['request_timeout_s']}; "
        f"{len(st.DEPARTMENTS)} departments, a {st.SOFT_TOKENS}-token soft prompt each, k={cfg['k']}, "
        f"max_tokens={cfg['max_tokens']}, greedy. One run on a shared machine.", "",
        "| load | requests | status counts | answers/s | p50 s (200) | p95 s (200) | Retry-After min/med/max s "
        "| time to 503 p50/p95/max s | server RSS before -> after MiB (peak) |",
        "|---|---:|---|---:|---:|---:|---|---|---|",
        f"| {cl['clients']} closed-loop clients, {cl['duration_s']:g} s | {cl['requests']} | {counts(cl)} | "
        f"{cl['answers_per_s']} ({cl['answers_per_s_in_window']} in window) | {cl['p50_latency_s']} | "
        f"{cl['p95_latency_s']} | {ra(cl)} | {t5(cl)} | {cl['rss_before']['rss_mib']} -> "
        f"{cl['rss_after']['rss_mib']} ({cl['rss_after']['peak_rss_mib']}) |",
        f"| burst of {b['burst']} at once | {b['requests']} | {counts(b)} | {b['answers_per_s']} | "
        f"{b['p50_latency_s']} | {b['p95_latency_s']} | {ra(b)} | {t5(b)} | {b['rss_before']['rss_mib']} -> "
        f"{b['rss_after']['rss_mib']} ({b['rss_after']['peak_rss_mib']}) |", "",
        f"Closed loop: wall {cl['wall_s']} s ({cl['duration_s']:g} s of sending + drain), "
        f"{cl['unfinished_at_drain_deadline']} client(s) "
        "still waiting at the drain deadline; a client honours a 503's Retry-After before its next request.",
        f"Burst: wall {b['wall_s']} s, last 200 at {b['last_200_done_at_s']} s, 503 codes {b['503_codes']}.", "",
        "## Retry-After probes (one request sent at first 503 + the given Retry-After)", "",
        "| Retry-After | sent at s | status | latency s | its Retry-After |", "|---|---:|---:|---:|---:|",
    ]
    for p in b["probes"]:
        lines.append(f"| {p['label']} = {p['retry_after_used']} | {p['sent_at_s']} | {p['status']} | "
                     f"{p['latency_s']} | {p['retry_after']} |")
    errs = cl["sample_errors"] + b["sample_errors"]
    if errs:
        lines += ["", "Sample errors:", "", *(f"- {e}" for e in sorted(set(errs))[:6])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--drain", type=float, default=120.0)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--burst-timeout", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--chunk-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start, load_start = time.time(), round(os.getloadavg()[0], 2)
    work = Path(tempfile.mkdtemp(prefix="ragpt-load-"))
    try:
        print(f"[load] building the 4-department index and prompts in {work}", flush=True)
        questions = st.build_fixture(work, args.chunk_tokens, args.k)
        cfg_path = st.write_config(work, "load", BATCHING, True, args.max_tokens)
        text = cfg_path.read_text()
        assert "request_timeout_s = 900" in text
        cfg_path.write_text(text.replace("request_timeout_s = 900", f"request_timeout_s = {TIMEOUT_S}"))
        from services.config import load_service_config

        svc = load_service_config(cfg_path)
        server = st.Server(work, cfg_path, args.threads, args.k)
        res: dict = {}
        try:
            server.wait_ready()
            pid = server.proc.pid
            st.warm_up(server.url, questions, args.max_tokens)  # also gives admission a measured rate
            before = rss_kib(pid)
            print(f"[load] closed loop: {args.clients} clients for {args.duration:g} s", flush=True)
            cl = asyncio.run(closed_loop(server.url, questions, args.clients, args.duration, args.drain,
                                         args.max_tokens))
            cl["rss_before"], cl["rss_after"] = before, rss_kib(pid)
            res["closed_loop"] = cl
            print(f"[load] closed loop: {cl['status_counts']}, {cl['answers_per_s']} answers/s, "
                  f"p50 {cl['p50_latency_s']}s p95 {cl['p95_latency_s']}s, RA {cl['retry_after_s']}", flush=True)
            time.sleep(2.0)
            b_before = rss_kib(pid)
            print(f"[load] burst of {args.burst}", flush=True)
            b = asyncio.run(burst(server.url, questions, args.burst, args.burst_timeout, args.max_tokens))
            b["rss_before"], b["rss_after"] = b_before, rss_kib(pid)
            res["burst"] = b
            print(f"[load] burst: {b['status_counts']}, p50 {b['p50_latency_s']}s p95 {b['p95_latency_s']}s, "
                  f"RA {b['retry_after_s']}, time to 503 {b['time_to_503_s']}, probes "
                  f"{[(p['label'], p['status']) for p in b['probes']]}", flush=True)
            res["server_alive_at_end"] = server.proc.poll() is None
        finally:
            server.stop()
        s = st.load_settings()
        res["config"] = {
            "command": CMD, "generator": s.generator, "threads": args.threads, "k": args.k,
            "chunk_tokens": args.chunk_tokens, "max_tokens": args.max_tokens, "batching": BATCHING,
            "max_batch_size": svc.batching.max_batch_size, "max_queue": getattr(svc.batching, "max_queue", None),
            "request_timeout_s": svc.limits.request_timeout_s, "clients": args.clients,
            "duration_s": args.duration, "drain_s": args.drain, "burst": args.burst,
            "burst_timeout_s": args.burst_timeout, "cpus": os.cpu_count(), "load_avg_start": load_start,
            "load_avg_end": round(os.getloadavg()[0], 2), "seconds": round(time.time() - t_start, 1),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_load.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "serve_load.md").write_text(markdown(res))
        print(markdown(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
