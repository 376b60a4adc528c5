"""The audit log is the registry's state, under kill -9 at random moments.

A subprocess loops over registry changes (register, approve, activate, rollback, deactivate) and
is killed with SIGKILL at a random moment, again and again. Afterwards the log must read back
(at most a torn last line), every change in it must follow from the one before (no activation
whose "from" is not the version that was active: nothing lost), the registry must report what the
log says, every registered version must load with its checksum, and the next change must leave
no temp file or folder behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ragpt.softprompts.artifact import SoftPrompt
from ragpt.softprompts.audit_log import read_log
from ragpt.softprompts.registry import PromptRegistry

os.environ["HF_HUB_OFFLINE"] = "1"

KILLS = 56
REGISTER_EVERY = 4  # one life in four also registers versions (it loads torch, ~1 s)
LIFE_DEADLINE_S = 20  # the child stops by itself if it is never killed
FP = "0123456789abcdef" * 4
HIDDEN = 8

CHILD = r"""
import random, sys, time
from ragpt.softprompts.registry import IllegalTransitionError, PromptRegistry

root, seed, registers = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if registers:
    import torch
    from ragpt.softprompts.artifact import SoftPrompt
rng = random.Random(seed)
reg = PromptRegistry(root)
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[4])
while time.monotonic() < deadline:
    rows = reg.versions("hr")
    drafts = [r["version"] for r in rows if r["state"] == "draft"]
    approved = [r["version"] for r in rows if r["state"] == "approved"]
    op = rng.choice(["register", "approve", "activate", "activate", "rollback", "deactivate"])
    try:
        if op == "register" and registers:
            t = torch.randn(2, 8, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
            reg.register(SoftPrompt.create(t, department="hr", base_fingerprint="0123456789abcdef" * 4),
                         actor="churn", reason=f"seed {seed}")
        elif op == "approve" and drafts:
            reg.approve("hr", rng.choice(drafts), actor="churn")
        elif op == "activate" and approved:
            reg.activate("hr", rng.choice(approved), actor="churn", reason="loop")
        elif op == "rollback":
            reg.rollback("hr", actor="churn")
        elif op == "deactivate" and rng.random() < 0.3:
            reg.deactivate("hr", actor="churn")
    except IllegalTransitionError:
        pass
"""


def _prompt(seed: int) -> SoftPrompt:
    t = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return SoftPrompt.create(t, department="hr", base_fingerprint=FP)


def _independent_replay(records: list[dict]) -> tuple[dict[str, str], str | None]:
    """The test's own reading of the log: version states and the active version, asserting that
    each change follows from the state before it."""
    states: dict[str, str] = {}
    active = None
    for rec in records:
        if rec.get("format") != 2 or rec["department"] != "hr":
            continue
        v, action = rec["version"], rec["action"]
        if action == "register":
            assert v not in states, rec
            states[v] = "draft"
        elif action == "approve":
            assert states.get(v) == "draft", rec
            states[v] = "approved"
        else:
            assert action in ("activate", "rollback", "deactivate"), rec
            assert states.get(v) == "approved", rec
            assert rec["from"] == active, f"lost change before {rec}: active was {active}"
            active = rec["to"]
            assert active == (None if action == "deactivate" else v)
    return states, active


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if p.name != ".registry.lock" and (p.is_dir() or p.name.endswith(".tmp")))


def test_kill_9_at_random_moments_never_loses_a_change(tmp_path):
    root = tmp_path / "prompts"
    reg = PromptRegistry(root)
    for i in range(3):
        reg.approve("hr", reg.register(_prompt(i), actor="setup"), actor="setup")
    rng = random.Random(14)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torn_seen = 0
    t0 = time.monotonic()
    for life in range(KILLS):
        registers = life % REGISTER_EVERY == 0
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(life), "1" if registers else "0", str(LIFE_DEADLINE_S)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.25))
            assert proc.poll() is None, f"the loop ended before it was killed: {proc.stderr.read()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        torn_seen += read_log(root / "audit.jsonl").torn_bytes > 0
    elapsed = time.monotonic() - t0

    contents = read_log(root / "audit.jsonl")  # every complete line parses
    records = [r for r in contents.records if r["department"] == "hr"]
    changes = sum(r["action"] != "register" for r in records)
    assert changes > 3 * KILLS, f"the loop made only {changes} changes in {KILLS} lives ({elapsed:.0f} s)"
    assert sum(r["action"] == "register" for r in records) > 3  # registrations were killed too

    states, active = _independent_replay(contents.records)
    fresh = PromptRegistry(root)
    assert fresh.active_version("hr") == active
    assert {r["version"]: r["state"] for r in fresh.versions("hr")} == \
        {v: ("active" if v == active else s) for v, s in states.items()}
    assert not (root / "hr" / "state.json").exists()  # no second copy of the state to disagree
    for v in states:  # every registered version is complete and matches its recorded checksum
        fresh.load("hr", v, base_fingerprint=FP, hidden_size=HIDDEN)

    # The next change cuts a torn line, removes the temp files killed writers left, and is logged.
    v = fresh.register(_prompt(99), actor="after")
    assert _leftovers(root) == []
    after = read_log(root / "audit.jsonl")
    assert after.torn_bytes == 0 and after.records[-1]["version"] == v
    assert after.records[:-1] == contents.records
    print(f"{KILLS} kills in {elapsed:.0f} s, {len(records)} records, torn tails seen after {torn_seen} kills")


def test_a_torn_last_line_is_ignored_and_cut_by_the_next_change(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    v1 = reg.register(_prompt(0), actor="a")
    reg.approve("hr", v1, actor="a")
    line = json.dumps({"format": 2, "action": "activate", "department": "hr", "version": v1,
                       "from": None, "to": v1, "actor": "a", "reason": "", "time": "t"})
    with open(reg.log_path, "a") as f:
        f.write(line[: len(line) // 2])  # what a kill in the middle of an append leaves
    fresh = PromptRegistry(reg.root)
    assert fresh.active_version("hr") is None  # the cut-short change never happened
    assert [r["action"] for r in fresh.audit("hr")] == ["register", "approve"]
    fresh.activate("hr", v1, actor="b")
    text = reg.log_path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    assert [json.loads(x)["actor"] for x in text.splitlines()] == ["a", "a", "b"]
    assert PromptRegistry(reg.root).active_version("hr") == v1


def test_the_next_change_removes_what_killed_writers_left(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    reg.register(_prompt(0), actor="a")
    (reg.root / "hr" / ".v2.k3j4").mkdir()  # a registration killed while saving
    (reg.root / "hr" / ".v2.k3j4" / "prompt.safetensors").write_bytes(b"half")
    (reg.root / "hr" / ".state.json.x1.tmp").write_text("{")  # an atomic write of the old layout
    (reg.root / ".audit.jsonl.y2.tmp").write_text("{")
    assert _leftovers(reg.root)
    assert reg.register(_prompt(1), actor="a") == "v2"  # the temp folder's number is free
    assert _leftovers(reg.root) == []
