"""Many departments: a service of 30 departments (half plain, half deep prompts) with a prefix cache of 4.

What must hold however many departments there are (benchmarks/departments_scale.py measures the
speed at 1000): nothing is loaded at start-up, the prefix cache and the loaded prompt tensors stay
at their bound, a cold department's first request computes exactly one prefix, a damaged version
fails its own department's requests (clearly, at first use) and nobody else's, and /v1/models and
`ragpt prompts list` stay correct. The registry's incremental log reading is checked against a
full re-read. A live uvicorn, the tiny random generator and the real embedder; no timed assertions.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import build_tiny_model, live_server

from ragpt.data.ingest import ingest
from ragpt.lm.generator import Generator, PrefixCache
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.audit_log import read_log, replay
from ragpt.softprompts.registry import PromptRegistry, RegistryDamagedError, UnknownPromptDepartmentError
from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key
from ragpt_service.config import ServiceConfig

pytestmark = pytest.mark.integration  # the real embedder builds the index

N_DEPTS = 30
CACHE = 4
KEY, FEW_KEY, METRICS_KEY = "key-all", "key-two", "key-metrics"
FEW = ("d0001", "d0002")
INDEX = "many"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


def dept(i: int) -> str:
    return f"d{i:04d}"


def deep(i: int) -> bool:
    return i % 2 == 1


@pytest.fixture(scope="module")
def gen(tiny_tokenizer) -> Generator:
    return Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)


@pytest.fixture(scope="module")
def fleet(real_settings, real_embedder, gen, tmp_path_factory):
    """Settings with an index of one small handbook per department and a registry of one active
    version per department (even: plain 3 x 64, odd: deep over both layers, 2 x 3 x 64); d0000
    also has a draft v2."""
    work = tmp_path_factory.mktemp("fleet")
    docs = work / "docs"
    for i in range(N_DEPTS):
        p = docs / dept(i) / "handbook.md"
        p.parent.mkdir(parents=True)
        p.write_text(f"# {dept(i)}\n\nThe {dept(i)} help desk is in room {100 + i} and opens at {7 + i % 3}.\n")
        ingest(work / "indexes", INDEX, [docs / dept(i)], [dept(i)], real_embedder, source_root=docs,
               chunk_tokens=real_settings.chunk_tokens, chunk_overlap=real_settings.chunk_overlap, progress=False)
    reg = PromptRegistry(work / "prompts")
    fp = base_model_fingerprint(gen.base_model)
    scale = float(gen.embedding.weight.std())
    for i in range(N_DEPTS):
        shape = (2, 3, gen.hidden_size) if deep(i) else (3, gen.hidden_size)
        t = torch.randn(*shape, generator=torch.Generator().manual_seed(i)) * scale
        v = reg.register(SoftPrompt.create(t, department=dept(i), base_fingerprint=fp), actor="test")
        reg.approve(dept(i), v, actor="test")
        reg.activate(dept(i), v, actor="test")
    reg.register(SoftPrompt.create(torch.zeros(3, gen.hidden_size) + 0.01, department=dept(0), base_fingerprint=fp),
                 actor="test", reason="a draft, never served")
    return real_settings.model_copy(update={"index_dir": work / "indexes", "prompt_dir": work / "prompts",
                                            "max_new_tokens": 2})


def _config(**batching) -> ServiceConfig:
    departments = {dept(i): {"api_keys": [hash_api_key(KEY)] + ([hash_api_key(FEW_KEY)] if dept(i) in FEW else [])}
                   for i in range(N_DEPTS)}
    return ServiceConfig.model_validate({"index": INDEX, "departments": departments,
                                         "metrics": {"api_keys": [hash_api_key(METRICS_KEY)]},
                                         "batching": {"prefix_cache_size": CACHE, **batching}})


@pytest.fixture
def service(fleet, real_embedder, tiny_tokenizer):
    """(url, runtime) of a live service with a fresh generator (its own prefix cache and counters)."""
    generator = Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)
    app = create_app(_config(), fleet, embedder=real_embedder, generator=generator, background_load=False)
    with live_server(app) as url:
        yield url, app.state.runtime


def _ask(url: str, model: str, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "Where is the help desk?"}],
                            "max_tokens": 2})


def _misses(url: str) -> int:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=30)
    line = next(x for x in r.text.splitlines() if x.startswith("ragpt_prefix_cache_misses_total "))
    return int(float(line.split()[1]))


# --------------------------------------------------------------------------- the service


def test_start_up_loads_no_prompt_and_the_cache_takes_the_configured_size(service):
    url, rt = service
    assert httpx.get(f"{url}/readyz").status_code == 200
    cache = rt.pipelines[dept(0)].generator.prefix_cache
    assert cache.max_entries == CACHE and len(cache) == 0
    assert all(p.loaded_prompts == [] for p in rt.pipelines.values())
    assert ServiceConfig.model_validate({"departments": {"a": {}}}).batching.prefix_cache_size == 64
    with pytest.raises(ValueError, match="prefix_cache_size"):
        _config(prefix_cache_size=0)


def test_eviction_keeps_the_cache_and_the_loaded_prompts_at_their_bound(service):
    url, rt = service
    pipe = rt.pipelines[dept(0)]
    cache = pipe.generator.prefix_cache
    touched = list(range(3, 15))  # 12 departments, 3 x the cache, plain and deep alternating
    for j, i in enumerate(touched, 1):
        assert _ask(url, dept(i)).status_code == 200
        assert len(cache) == min(j, CACHE)
        assert len(pipe.loaded_prompts) == min(j, CACHE)
    assert cache.misses == len(touched) and cache.evictions == len(touched) - CACHE
    # The most recently used stay, least recently used out, in both the cache and the tensors held.
    assert pipe.loaded_prompts == [(dept(i), "v1") for i in touched[-CACHE:]]
    assert sorted(k[1] for k in cache._entries) == [dept(i) for i in touched[-CACHE:]]


def test_a_cold_department_computes_exactly_one_prefix_and_a_warm_one_none(service):
    url, rt = service
    for i in (5, 6):  # a deep prompt and a plain one
        before = _misses(url)
        first = _ask(url, dept(i))
        assert first.status_code == 200 and first.json()["prompt_version"] == "v1"
        assert _misses(url) == before + 1
        again = _ask(url, dept(i))
        assert again.status_code == 200 and _misses(url) == before + 1
        assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    for i in range(7, 7 + CACHE):  # push 5 and 6 out of the cache
        assert _ask(url, dept(i)).status_code == 200
    before = _misses(url)
    assert _ask(url, dept(5)).status_code == 200
    assert _misses(url) == before + 1  # evicted: computed once more, then warm again
    assert _ask(url, dept(5)).status_code == 200 and _misses(url) == before + 1
    before = _misses(url)
    assert _ask(url, f"{dept(8)}@none").status_code == 200 and _misses(url) == before  # no prompt: no prefix


def _tamper(root: Path, department: str) -> tuple[Path, bytes]:
    path = root / department / "v1" / "prompt.safetensors"
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0x01  # one bit of the last value: same size, still a readable tensor
    path.write_bytes(bytes(bad))
    return path, good


def test_a_damaged_version_fails_its_own_department_only_at_first_use(fleet, real_embedder, tiny_tokenizer,
                                                                     caplog):
    path, good = _tamper(fleet.prompt_dir, dept(9))  # before start-up: nothing verifies it then
    try:
        generator = Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)
        app = create_app(_config(), fleet, embedder=real_embedder, generator=generator, background_load=False)
        with live_server(app) as url, caplog.at_level(logging.ERROR, logger="ragpt.service"):
            assert httpx.get(f"{url}/readyz").status_code == 200  # start-up does not read the versions
            bad = _ask(url, dept(9))
            assert bad.status_code == 503
            err = bad.json()["error"]
            assert err["code"] == "prompt_unavailable" and err["param"] == "model"
            assert f"{dept(9)} v1" in err["message"] and f"'{dept(9)}@none'" in err["message"]
            assert "/" not in err["message"] and "sha256" not in err["message"]  # no server detail to clients
            logged = [r.getMessage() for r in caplog.records if dept(9) in r.getMessage()]
            assert any("sha256 mismatch" in m and f"{dept(9)}/v1/prompt.safetensors" in m for m in logged), logged
            for model in (dept(8), dept(10), f"{dept(9)}@none"):  # everyone else, and d0009 without it
                assert _ask(url, model).status_code == 200, model
            models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
            assert next(m for m in models if m["id"] == dept(9))["active_prompt_version"] == "v1"
            path.write_bytes(good)  # restored: served at the next request (a failure is not kept)
            assert _ask(url, dept(9)).status_code == 200
            # A version that was loaded, evicted, and damaged meanwhile is verified again on reload.
            for i in range(11, 11 + CACHE + 1):
                assert _ask(url, dept(i)).status_code == 200
            assert (dept(9), "v1") not in app.state.runtime.pipelines[dept(9)].loaded_prompts
            _tamper(fleet.prompt_dir, dept(9))
            assert _ask(url, dept(9)).json()["error"]["code"] == "prompt_unavailable"
    finally:
        path.write_bytes(good)


def test_a_version_made_for_another_model_says_so_not_that_it_is_damaged(fleet, real_embedder, tiny_tokenizer,
                                                                       tmp_path, caplog):
    import shutil

    prompts = tmp_path / "prompts"
    shutil.copytree(fleet.prompt_dir, prompts)
    settings = fleet.model_copy(update={"prompt_dir": prompts})
    other = base_model_fingerprint(build_tiny_model(tiny_tokenizer, seed=1))  # intact, for another model
    reg = PromptRegistry(prompts)
    v = reg.register(SoftPrompt.create(torch.zeros(3, 64) + 0.01, department=dept(3), base_fingerprint=other),
                     actor="test")
    reg.approve(dept(3), v, actor="test")  # approved: servable when pinned, not active
    generator = Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)
    app = create_app(_config(), settings, embedder=real_embedder, generator=generator, background_load=False)
    with live_server(app) as url, caplog.at_level(logging.ERROR, logger="ragpt.service"):
        r = _ask(url, f"{dept(3)}@{v}")
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "prompt_unavailable"
        assert "made for another base model or embedder" in err["message"] and "integrity" not in err["message"]
        assert "retrain or roll back" in err["message"] and "/" not in err["message"]
        assert any("trained for another base model" in rec.getMessage() for rec in caplog.records)
        assert _ask(url, dept(3)).status_code == 200  # its active version is served as before


def test_models_lists_every_department_with_its_served_versions_and_only_the_keys(service):
    url, _ = service
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    data = {m["id"]: m for m in r.json()["data"]}
    assert set(data) == {dept(i) for i in range(N_DEPTS)} | {"auto"}
    for i in range(N_DEPTS):
        assert data[dept(i)]["active_prompt_version"] == "v1"
        assert data[dept(i)]["prompt_versions"] == ["v1"]  # d0000's draft v2 is not served
    few = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {FEW_KEY}"}).json()["data"]
    assert [m["id"] for m in few] == [*FEW, "auto"]
    assert _ask(url, f"{dept(0)}@v2").json()["error"]["code"] == "model_not_found"  # a draft
    assert _ask(url, f"{dept(0)}@v1").status_code == 200


# --------------------------------------------------------------------------- the CLI


def test_prompts_list_lists_every_version_and_imports_no_torch(fleet, tmp_path):
    script = ("import json, sys\nfrom ragpt.cli.main import app\n"
              "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
              "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGPT_") or k == "RAGPT_CACHE_DIR"}
    p = subprocess.run([sys.executable, "-c", script, "--prompt-dir", str(fleet.prompt_dir), "prompts", "list",
                        "--json"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    status = json.loads(p.stderr.strip().splitlines()[-1])
    assert status == {"code": 0, "torch": False}, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == N_DEPTS + 1
    states = {(r["department"], r["version"]): r["state"] for r in rows}
    assert states[(dept(0), "v2")] == "draft"
    assert all(states[(dept(i), "v1")] == "active" for i in range(N_DEPTS))
    assert {r["department"]: r["depth"] for r in rows if r["version"] == "v1"} == \
        {dept(i): 2 if deep(i) else 1 for i in range(N_DEPTS)}
    assert all(r["n_tokens"] == 3 for r in rows)


# --------------------------------------------------------------------------- the registry


def _prompt(department: str, seed: int) -> SoftPrompt:
    t = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    return SoftPrompt.create(t, department=department, base_fingerprint="f" * 64)


def test_incremental_log_reads_replay_what_a_full_read_does(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    for i in range(6):
        d = f"x{i % 3}"
        held = reg._state(d, must_exist=False)  # the state object a reader holds
        snapshot = json.dumps(held, sort_keys=True)
        v = reg.register(_prompt(d, i), actor="t")
        reg.approve(d, v, actor="t")
        if i % 2 == 0:
            reg.activate(d, v, actor="t")
        # Only the appended lines were parsed ...
        assert reg._log()[0].carried > 0
        # ... and they give what a fresh registry replays from the whole file.
        fresh = replay(read_log(reg.log_path))
        assert fresh.states == reg._log()[1].states and fresh.damaged == reg._log()[1].damaged
        # A state handed out before the change did not change under its reader.
        assert json.dumps(held, sort_keys=True) == snapshot != json.dumps(reg._state(d), sort_keys=True)
    assert reg.states("x0") == {"v1": "active", "v2": "approved"}  # x0: i = 0 (activated), 3
    assert reg.active_version_or_none("x1") == "v2" and reg.active_version_or_none("nobody") is None
    with pytest.raises(UnknownPromptDepartmentError):
        reg.states("nobody")


def test_an_edit_in_place_of_the_log_is_seen_not_extended(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    v = reg.register(_prompt("hr", 0), actor="t")
    reg.approve("hr", v, actor="t")
    assert reg.states("hr") == {"v1": "approved"}
    # The same file rewritten (same inode), with a line that claims an activation from a wrong version.
    lines = reg.log_path.read_text().splitlines()
    bad = json.dumps({**json.loads(lines[1]), "action": "activate", "from": "v9", "to": "v1"})
    with open(reg.log_path, "r+") as f:
        f.write("\n".join([lines[0], bad, lines[1]]) + "\n")
    with pytest.raises(RegistryDamagedError, match="line 2"):
        reg.states("hr")


def test_a_change_cleans_the_root_and_its_own_department_and_leaves_others_for_theirs(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    reg.register(_prompt("hr", 0), actor="t")
    reg.register(_prompt("it", 1), actor="t")
    (reg.root / "hr" / ".v2.dead").mkdir()  # registrations killed while saving
    (reg.root / "it" / ".v2.dead").mkdir()
    (reg.root / ".audit.jsonl.x.tmp").write_text("{")
    assert reg.register(_prompt("hr", 2), actor="t") == "v2"
    assert not (reg.root / "hr" / ".v2.dead").exists() and not (reg.root / ".audit.jsonl.x.tmp").exists()
    assert (reg.root / "it" / ".v2.dead").exists()  # its leftover goes at its own next change
    assert reg.register(_prompt("it", 3), actor="t") == "v2"
    assert not (reg.root / "it" / ".v2.dead").exists()


def test_prefix_cache_resize_evicts_least_recently_used_and_counts():
    cache = PrefixCache(4)
    tensors = [torch.full((1, 2), float(i)) for i in range(4)]
    for i, t in enumerate(tensors):
        cache.get(i, t, lambda sp: _kv(sp))
    cache.get(0, tensors[0], lambda sp: pytest.fail("a hit computes nothing"))
    cache.resize(2)
    assert len(cache) == 2 and 0 in cache and 3 in cache and cache.evictions == 2
    assert (cache.hits, cache.misses) == (1, 4)
    with pytest.raises(ValueError, match="at least 1"):
        cache.resize(0)


def _kv(sp: torch.Tensor):
    from ragpt.lm.generator import PrefixKV

    return PrefixKV(n_tokens=1, keys=(sp,), values=(sp,), source=sp)
