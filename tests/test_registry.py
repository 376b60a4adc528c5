"""PromptRegistry: versions, the draft -> approved -> active life cycle, rollback, audit log,
safety under concurrent processes, and the `ragpt prompts` CLI."""

from __future__ import annotations

import getpass
import json
import multiprocessing
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ragpt.errors import RagptError, SoftPromptError, UnknownDepartmentError  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint, import_peft  # noqa: E402
from ragpt.softprompts.audit_log import read_log, replay  # noqa: E402
from ragpt.softprompts.registry import (  # noqa: E402
    IllegalTransitionError,
    NoActivePromptError,
    PromptRegistry,
    UnknownPromptDepartmentError,
    UnknownVersionError,
)

HIDDEN = 64
FP = "0123456789abcdef" * 4  # a stand-in base-model fingerprint for tests that run no model


def make_prompt(seed: int, dept: str = "hr", n_tokens: int = 4, fp: str = FP,
                **meta) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt.create(torch.randn(n_tokens, HIDDEN, generator=g), department=dept,
                             base_fingerprint=fp, author="trainer", **meta)


@pytest.fixture
def reg(tmp_path) -> PromptRegistry:
    return PromptRegistry(tmp_path / "prompts")


def approved(reg: PromptRegistry, n: int, dept: str = "hr") -> list[str]:
    versions = [reg.register(make_prompt(i, dept), actor="trainer") for i in range(n)]
    for v in versions:
        reg.approve(dept, v, actor="reviewer")
    return versions


def states(reg: PromptRegistry, dept: str = "hr") -> dict[str, str]:
    return {r["version"]: r["state"] for r in reg.versions(dept)}


# --------------------------------------------------------------------------- versions


def test_register_numbers_versions_and_stores_drafts(reg):
    p = make_prompt(0, metrics={"em": 0.4})
    assert [reg.register(p, actor="alice") for _ in range(3)] == ["v1", "v2", "v3"]
    assert reg.register(make_prompt(0, dept="it"), actor="alice") == "v1"  # numbered per dept
    assert p.version is None  # the caller's object is not changed
    assert reg.departments() == ["hr", "it"]
    rows = reg.versions("hr")
    assert [(r["version"], r["state"]) for r in rows] == [("v1", "draft"), ("v2", "draft"),
                                                          ("v3", "draft")]
    assert rows[0]["author"] == "trainer" and rows[0]["metrics"] == {"em": 0.4}
    assert rows[0]["created"] == p.meta["created"]
    loaded = reg.load("hr", "v2", base_fingerprint=FP, hidden_size=HIDDEN)
    assert loaded.version == "v2" and loaded.department == "hr"
    assert torch.equal(loaded.tensor, p.tensor)
    assert reg.active_version("hr") is None


def test_version_numbers_are_never_reused(reg):
    reg.register(make_prompt(0), actor="a")
    (reg.root / "hr" / "v2").mkdir()  # e.g. left by a crash before state.json was written
    assert reg.register(make_prompt(1), actor="a") == "v3"
    assert reg.register(make_prompt(2), actor="a") == "v4"
    for v in (reg.root / "hr").iterdir():
        assert not v.name.startswith(".")  # no temp folders left behind


def test_lifecycle_draft_approved_active(reg):
    v1, v2 = (reg.register(make_prompt(i), actor="trainer") for i in range(2))
    with pytest.raises(IllegalTransitionError, match="approve it before activating"):
        reg.activate("hr", v1, actor="ops")
    reg.approve("hr", v1, actor="reviewer", reason="eval ok")
    assert states(reg) == {"v1": "approved", "v2": "draft"}
    reg.activate("hr", v1, actor="ops")
    assert states(reg) == {"v1": "active", "v2": "draft"}
    assert reg.active_version("hr") == "v1"
    assert reg.load("hr").version == "v1"
    reg.approve("hr", v2, actor="reviewer")
    reg.activate("hr", v2, actor="ops")
    # One active version per department: activating v2 retires v1 to approved.
    assert states(reg) == {"v1": "approved", "v2": "active"}
    assert torch.equal(reg.load("hr").tensor, make_prompt(1).tensor)


def test_approving_twice_and_reactivating_are_refused(reg):
    (v1,) = approved(reg, 1)
    with pytest.raises(IllegalTransitionError, match="already approved"):
        reg.approve("hr", v1, actor="reviewer")
    reg.activate("hr", v1, actor="ops")
    with pytest.raises(IllegalTransitionError, match="already active"):
        reg.activate("hr", v1, actor="ops")
    assert [r["action"] for r in reg.audit("hr")] == ["register", "approve", "activate"]


def test_rollback_walks_back_through_activations(reg):
    v1, v2, v3 = approved(reg, 3)
    for v in (v1, v2, v3):
        reg.activate("hr", v, actor="ops")
    assert reg.rollback("hr", actor="oncall", reason="v3 hallucinates") == v2
    assert reg.active_version("hr") == v2
    assert reg.rollback("hr", actor="oncall") == v1
    with pytest.raises(IllegalTransitionError, match="no earlier approved version"):
        reg.rollback("hr", actor="oncall")
    assert reg.active_version("hr") == v1
    reg.activate("hr", v3, actor="ops")
    assert reg.rollback("hr", actor="oncall") == v1  # v3 replaced v1, so back to v1
    assert [(r["version"], r["action"]) for r in reg.audit("hr")
            if r["action"] in ("activate", "rollback")] == [
        ("v1", "activate"), ("v2", "activate"), ("v3", "activate"), ("v2", "rollback"),
        ("v1", "rollback"), ("v3", "activate"), ("v1", "rollback")]


def test_rollback_after_reactivating_an_older_version(reg):
    v1, v2 = approved(reg, 2)
    for v in (v1, v2, v1):
        reg.activate("hr", v, actor="ops")
    assert reg.rollback("hr", actor="ops") == v2  # v2 was active before the current v1
    assert reg.rollback("hr", actor="ops") == v1


def test_rollback_needs_an_active_and_a_previous_version(reg):
    (v1,) = approved(reg, 1)
    with pytest.raises(IllegalTransitionError, match="no active version"):
        reg.rollback("hr", actor="ops")
    reg.activate("hr", v1, actor="ops")
    with pytest.raises(IllegalTransitionError, match="no earlier approved version"):
        reg.rollback("hr", actor="ops")


def test_deactivate_takes_the_active_version_out_of_service(reg):
    v1, v2 = approved(reg, 2)
    with pytest.raises(IllegalTransitionError, match="no active version to deactivate"):
        reg.deactivate("hr", actor="ops")
    reg.activate("hr", v1, actor="ops")
    assert reg.deactivate("hr", actor="ops", reason="worse than no prompt on the test set") == v1
    assert reg.active_version("hr") is None
    with pytest.raises(NoActivePromptError):
        reg.load("hr")
    assert [r["state"] for r in reg.versions("hr")] == ["approved", "approved"]
    last = reg.audit("hr")[-1]
    assert (last["action"], last["version"], last["from"], last["to"]) == ("deactivate", v1, v1, None)
    assert last["reason"] == "worse than no prompt on the test set"
    # Rollback never returns to a version that was pulled.
    reg.activate("hr", v2, actor="ops")
    with pytest.raises(IllegalTransitionError, match="no earlier approved version"):
        reg.rollback("hr", actor="ops")
    reg.activate("hr", v1, actor="ops")  # an explicit activation may bring it back
    assert reg.rollback("hr", actor="ops") == v2


def test_clear_errors_for_unknown_things(reg):
    reg.register(make_prompt(0), actor="a")
    with pytest.raises(NoActivePromptError, match="no active soft prompt"):
        reg.load("hr")
    with pytest.raises(UnknownPromptDepartmentError, match="'sales' has no soft prompts") as e:
        reg.load("sales")
    assert isinstance(e.value, UnknownDepartmentError)
    with pytest.raises(UnknownVersionError, match=r"no version 'v9' \(known: v1\)"):
        reg.approve("hr", "v9", actor="a")
    with pytest.raises(RagptError, match="invalid department name"):
        reg.load("../etc")
    with pytest.raises(RagptError, match="invalid version name"):
        reg.load("hr", "../v1")
    with pytest.raises(RagptError, match="actor"):
        reg.approve("hr", "v1", actor=" ")


def test_load_validates_the_artifact(reg):
    reg.register(make_prompt(0), actor="a")
    with pytest.raises(SoftPromptError, match="trained for another base model"):
        reg.load("hr", "v1", base_fingerprint="f" * 64)
    with pytest.raises(SoftPromptError, match="hidden size"):
        reg.load("hr", "v1", hidden_size=32)
    # meta.json is not covered by the tensor checksum; the registry remembers its hash.
    meta_path = reg.root / "hr" / "v1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {"em": 0.99}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SoftPromptError, match="changed since it was registered"):
        reg.load("hr", "v1")


def test_audit_log_records_every_change(reg):
    t0 = datetime.now().astimezone()
    v1, v2 = (reg.register(make_prompt(i), actor="trainer", reason=f"run {i}") for i in range(2))
    reg.approve("hr", v1, actor="rev", reason="looks good")
    reg.approve("hr", v2, actor="rev")
    reg.activate("hr", v1, actor="ops", reason="launch")
    reg.activate("hr", v2, actor="ops", reason="better em")
    reg.rollback("hr", actor="oncall", reason="complaints")
    reg.register(make_prompt(5, dept="it"), actor="trainer")
    with pytest.raises(IllegalTransitionError):  # refused changes leave no record
        reg.approve("hr", v1, actor="rev")

    records = reg.audit("hr")
    assert [(r["action"], r["version"], r["actor"], r["reason"]) for r in records] == [
        ("register", "v1", "trainer", "run 0"), ("register", "v2", "trainer", "run 1"),
        ("approve", "v1", "rev", "looks good"), ("approve", "v2", "rev", ""),
        ("activate", "v1", "ops", "launch"), ("activate", "v2", "ops", "better em"),
        ("rollback", "v1", "oncall", "complaints")]
    assert [(r.get("from"), r.get("to")) for r in records[4:]] == [
        (None, "v1"), ("v1", "v2"), ("v2", "v1")]
    for r in records:
        assert r["department"] == "hr"
        assert t0 <= datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
    assert len(reg.audit()) == 8 and reg.audit("it")[0]["action"] == "register"
    lines = (reg.root / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line) for line in lines)


def test_diff(reg):
    reg.register(make_prompt(0, metrics={"em": 0.4}), actor="a")
    reg.register(make_prompt(1, metrics={"em": 0.6}), actor="b")
    reg.register(make_prompt(2, n_tokens=8), actor="a")
    d = reg.diff("hr", "v1", "v2")
    assert d["metadata"]["metrics"] == {"a": {"em": 0.4}, "b": {"em": 0.6}}
    assert d["metadata"]["version"] == {"a": "v1", "b": "v2"}
    assert "base_model_fingerprint" not in d["metadata"] and "hidden_size" not in d["metadata"]
    a, b = make_prompt(0).tensor, make_prompt(1).tensor
    t = d["tensor"]
    assert t["same_shape"] and t["l2_distance"] == pytest.approx(float(torch.dist(a, b)))
    assert t["norm_a"] == pytest.approx(float(a.norm()))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
    assert t["mean_token_cosine"] == pytest.approx(float(cos))
    same = reg.diff("hr", "v1", "v1")["tensor"]
    assert same["l2_distance"] == 0 and same["mean_token_cosine"] == pytest.approx(1.0)
    other = reg.diff("hr", "v1", "v3")
    assert not other["tensor"]["same_shape"] and other["tensor"]["l2_distance"] is None
    assert other["metadata"]["n_tokens"] == {"a": 4, "b": 8}
    json.dumps(d)  # plain JSON, for the CLI


def test_peft_export_and_import_through_the_registry(reg, tmp_path):
    from transformers import LlamaConfig

    reg.register(make_prompt(0), actor="a")
    config = LlamaConfig(vocab_size=100, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    out = reg.export_peft("hr", "v1", tmp_path / "peft", base_model_name_or_path="tiny",
                          model_config=config)
    v = reg.import_peft(out, "legal", actor="carol", base_fingerprint=FP, reason="from hr",
                        hidden_size=HIDDEN)
    assert v == "v1" and states(reg, "legal") == {"v1": "draft"}
    assert torch.equal(reg.load("legal", "v1").tensor, reg.load("hr", "v1").tensor)
    rec = reg.audit("legal")[0]
    assert (rec["action"], rec["actor"], rec["source"]) == ("import", "carol", str(out.resolve()))


# --------------------------------------------------------------------------- concurrency

WORKERS = 4
PER_WORKER = 12


def _worker(root: str, worker: int) -> list[tuple[str, int]]:
    """Register, approve and activate PER_WORKER prompts, racing the other workers."""
    reg = PromptRegistry(root)
    done = []
    for i in range(PER_WORKER):
        seed = 1000 * worker + i
        dept = "shared" if i % 3 else f"dept{worker}"  # mostly one contended department
        v = reg.register(make_prompt(seed, dept=dept), actor=f"w{worker}", reason=str(seed))
        reg.approve(dept, v, actor=f"w{worker}")
        reg.activate(dept, v, actor=f"w{worker}")
        done.append((dept, v, seed))
    return done


def test_concurrent_processes_never_corrupt_the_registry(reg):
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter each, as separate CLIs
    with ctx.Pool(WORKERS) as pool:
        results = pool.starmap(_worker, [(str(reg.root), w) for w in range(WORKERS)])
    done = [r for rs in results for r in rs]
    assert len(done) == WORKERS * PER_WORKER
    assert len({(d, v) for d, v, _ in done}) == len(done)  # no version handed out twice

    for dept in reg.departments():
        state = replay(read_log(reg.log_path)).states[dept]
        mine = sorted((v for d, v, _ in done if d == dept), key=lambda v: int(v[1:]))
        assert mine == [f"v{i}" for i in range(1, len(mine) + 1)]  # dense, all present
        assert sorted(state["versions"]) == sorted(mine)
        assert all(e["state"] == "approved" for e in state["versions"].values())
        assert len(state["activations"]) == len(mine)
        assert state["active"] == state["activations"][-1]["version"]
    assert sorted(reg.departments()) == sorted({"shared", *(f"dept{w}" for w in range(WORKERS))})
    for dept, v, seed in done:  # every version holds the bytes its worker registered
        assert torch.equal(reg.load(dept, v).tensor, make_prompt(seed).tensor)

    lines = (reg.root / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(done)
    records = [json.loads(line) for line in lines]
    assert sorted((r["department"], r["version"], r["action"]) for r in records) == sorted(
        (d, v, a) for d, v, _ in done for a in ("register", "approve", "activate"))


# --------------------------------------------------------------------------- CLI


def build_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.fixture
def generator_dir(tmp_path) -> Path:
    """A tiny Llama + tokenizer saved as a local HF folder, usable as settings.generator."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, pad_token_id=0))
    folder = tmp_path / "tiny-generator"
    model.save_pretrained(folder)
    build_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def cli(tmp_path, generator_dir):
    """Invoke `prompts ...` on a root app that sets ctx.obj the way ragpt.cli.main.main does."""
    from ragpt.cli.prompts import prompts_app

    root = typer.Typer()

    @root.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = {"prompt_dir": tmp_path / "prompts", "generator": str(generator_dir),
                   "cache_dir": tmp_path / "cache"}

    root.add_typer(prompts_app, name="prompts")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(root, ["prompts", *args])

    return invoke


def test_cli_review_activate_rollback(cli, tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    r = cli("list")
    assert r.exit_code == 0 and "no soft prompts registered" in r.output
    for i in range(2):
        reg.register(make_prompt(i, metrics={"em": 0.1 * i}), actor="trainer")

    r = cli("activate", "hr", "v1")
    assert r.exit_code == 2 and "approve it before activating" in r.output
    assert cli("approve", "hr", "v1", "--actor", "rev", "--reason", "ok").exit_code == 0
    assert cli("approve", "hr", "v2").exit_code == 0
    assert cli("activate", "hr", "v1").exit_code == 0
    r = cli("activate", "hr", "v2", "--reason", "better")
    assert r.exit_code == 0 and "hr v2: active" in r.output

    r = cli("list", "--department", "hr")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["hr", "v1", "approved"]
    assert lines[1].split()[:3] == ["hr", "v2", "active"]
    rows = json.loads(cli("list", "--json").output)
    assert [(x["version"], x["state"]) for x in rows] == [("v1", "approved"), ("v2", "active")]

    r = cli("rollback", "hr", "--reason", "regression")
    assert r.exit_code == 0 and "hr v1: active" in r.output
    assert reg.active_version("hr") == "v1"
    r = cli("rollback", "hr")
    assert r.exit_code == 2 and "no earlier approved version" in r.output

    meta = json.loads(cli("show", "hr", "v2").output)
    assert (meta["department"], meta["version"], meta["metrics"]) == ("hr", "v2", {"em": 0.1})
    d = json.loads(cli("diff", "hr", "v1", "v2").output)
    assert d["tensor"]["same_shape"] and d["metadata"]["version"] == {"a": "v1", "b": "v2"}
    r = cli("show", "hr", "v7")
    assert r.exit_code == 2 and "no version 'v7'" in r.output

    audit = reg.audit("hr")
    assert [(a["action"], a["actor"]) for a in audit[2:4]] == [("approve", "rev"),
                                                               ("approve", getpass.getuser())]
    assert audit[-1]["action"] == "rollback" and audit[-1]["reason"] == "regression"


def test_cli_log_prints_who_when_what_why_and_show_has_the_last_change(cli, tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    v1, v2 = approved(reg, 2)
    reg.activate("hr", v1, actor="ops", reason="first release")
    reg.activate("hr", v2, actor="ops", reason="better on dev")
    reg.rollback("hr", actor="oncall", reason="v2 cites the wrong policy")
    reg.register(make_prompt(5, dept="it"), actor="trainer", reason="nightly")

    r = cli("log", "-d", "hr")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 7 and all(line.startswith(str(datetime.now().year)) for line in lines)
    assert lines[-1].split()[2:] == ["hr", "v1", "rollback", "(v2", "->", "v1)", "by", "oncall:", "v2", "cites",
                                     "the", "wrong", "policy"]
    assert "activate (none -> v1)" in lines[4] and lines[4].endswith("by ops: first release")
    assert len(cli("log").output.splitlines()) == 8  # every department
    assert cli("log", "-v", "v2", "-d", "hr").output.count("\n") == 4  # register, approve, activate, rolled back from
    assert [json.loads(x)["action"] for x in cli("log", "-n", "2", "--json").output.splitlines()] == \
        ["rollback", "register"]
    r = cli("log", "-d", "nosuch")
    assert r.exit_code == 2 and "no soft prompts" in r.output

    shown = json.loads(cli("show", "hr", "v2").output)["registry"]
    assert shown["state"] == "approved" and shown["approved_by"] == "reviewer"
    assert shown["last_change"] == {**shown["last_change"], "action": "rollback", "actor": "oncall",
                                    "from": "v2", "to": "v1", "reason": "v2 cites the wrong policy"}
    assert json.loads(cli("show", "hr", "v1").output)["registry"]["state"] == "active"


def _old_layout(reg: PromptRegistry) -> dict:
    """What a registry from before the log was its state looks like: state.json per department
    and audit lines without a format (and without checksums)."""
    v1, v2 = approved(reg, 2)
    reg.activate("hr", v1, actor="ops")
    reg.activate("hr", v2, actor="ops")
    state = {"versions": {v: {k: e[k] for k in ("state", "registered", "registered_by", "sha256", "meta_sha256",
                                                  "approved", "approved_by")}
                          for v, e in reg._state("hr")["versions"].items()},
             "active": "v2", "activations": reg._state("hr")["activations"]}
    old_lines = [{k: r[k] for k in r if k not in ("format", "sha256", "meta_sha256")} for r in reg.audit()]
    reg.log_path.write_text("".join(json.dumps(x) + "\n" for x in old_lines))
    (reg.root / "hr" / "state.json").write_text(json.dumps(state))
    return state


def test_a_registry_from_before_the_log_was_its_state_is_read_and_then_adopted(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    _old_layout(reg)
    old = PromptRegistry(reg.root)
    assert old.departments() == ["hr"] and old.active_version("hr") == "v2"
    assert states(old) == {"v1": "approved", "v2": "active"}
    assert old.load("hr").version == "v2"  # checksums come from state.json
    assert (reg.root / "hr" / "state.json").is_file()  # reading changes nothing

    assert old.rollback("hr", actor="oncall", reason="after the upgrade") == "v1"
    assert not (reg.root / "hr" / "state.json").exists()
    actions = [r["action"] for r in old.audit("hr")]
    assert actions == ["register", "register", "approve", "approve", "activate", "activate", "migrate", "rollback"]
    fresh = PromptRegistry(reg.root)  # from the log alone
    assert fresh.active_version("hr") == "v1" and states(fresh) == {"v1": "active", "v2": "approved"}
    assert fresh.register(make_prompt(7), actor="t") == "v3"
    assert fresh.load("hr", "v2").version == "v2"


def test_a_damaged_log_is_a_clear_error_for_its_department_only(reg):
    approved(reg, 1)
    reg.register(make_prompt(0, dept="it"), actor="t")
    with open(reg.log_path, "a") as f:
        f.write(json.dumps({"format": 2, "action": "activate", "department": "hr", "version": "v1",
                            "from": "v4", "to": "v1", "actor": "x", "reason": "", "time": "t"}) + "\n")
    fresh = PromptRegistry(reg.root)
    with pytest.raises(RagptError, match=r"'hr': audit.jsonl line 4: 'activate' of v1 .* active version was v4"):
        fresh.versions("hr")
    with pytest.raises(RagptError, match="edited or damaged"):
        fresh.approve("hr", "v1", actor="x")
    assert fresh.departments() == ["hr", "it"] and states(fresh, "it") == {"v1": "draft"}
    with open(reg.log_path, "a") as f:
        f.write("{garbage\n")
    with pytest.raises(RagptError, match="audit.jsonl line 5: not valid JSON"):
        PromptRegistry(reg.root).versions("it")


def test_cli_export_and_import_peft(cli, tmp_path, generator_dir):
    from ragpt.config import Settings
    from ragpt.lm.models import load_generator_model

    reg = PromptRegistry(tmp_path / "prompts")
    reg.register(make_prompt(0), actor="trainer")
    out = tmp_path / "exported"
    r = cli("export", "hr", "v1", str(out))
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(generator_dir) and cfg["num_layers"] == 2
    assert torch.equal(import_peft(out, department="x", base_fingerprint=FP).tensor,
                       make_prompt(0).tensor)

    r = cli("import", str(out), "--department", "legal", "--actor", "carol")
    assert r.exit_code == 0, r.output
    assert "legal v1: imported as draft" in r.output
    model, _ = load_generator_model(Settings(generator=str(generator_dir),
                                             cache_dir=tmp_path / "cache"))
    imported = reg.load("legal", "v1", base_fingerprint=base_model_fingerprint(model))
    assert torch.equal(imported.tensor, make_prompt(0).tensor)
    assert reg.versions("legal")[0]["state"] == "draft"
    assert reg.audit("legal")[0]["actor"] == "carol"

    bad = tmp_path / "bad"
    bad.mkdir()
    r = cli("import", str(bad), "--department", "legal")
    assert r.exit_code == 2 and "adapter_config.json: missing" in r.output


def test_cli_exports_a_deep_prompt_as_prefix_tuning(cli, tmp_path, generator_dir):
    """`prompts export` picks prefix tuning for a deep prompt (auto) and checks its base model."""
    from ragpt.config import Settings
    from ragpt.lm.models import load_generator_model
    from ragpt.softprompts.deep import deep_from_shallow

    model, _ = load_generator_model(Settings(generator=str(generator_dir), cache_dir=tmp_path / "cache"))
    fp = base_model_fingerprint(model)
    reg = PromptRegistry(tmp_path / "prompts")
    deep = deep_from_shallow(model, torch.randn(4, HIDDEN), 2)
    reg.register(SoftPrompt.create(deep, department="hr", base_fingerprint=fp), actor="trainer")
    assert reg.versions("hr")[0]["depth"] == 2
    r = cli("export", "hr", "v1", str(tmp_path / "auto"))
    assert r.exit_code == 0 and "(prefix-tuning)" in r.output, r.output
    cfg = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_layers"], cfg["num_virtual_tokens"]) == ("PREFIX_TUNING", 2, 4)
    r = cli("export", "hr", "v1", str(tmp_path / "pt"), "--peft-type", "prompt-tuning")
    assert r.exit_code == 2 and "no PEFT prompt-tuning equivalent" in r.output
    assert not (tmp_path / "pt").exists()
    # A prompt registered for another base model is refused before anything is written.
    reg.register(SoftPrompt.create(deep, department="hr", base_fingerprint="0" * 64), actor="trainer")
    r = cli("export", "hr", "v2", str(tmp_path / "other"))
    assert r.exit_code == 2 and "another base model" in r.output
    assert not (tmp_path / "other").exists()


def test_cli_export_says_a_query_adapter_does_not_travel_with_peft(cli, tmp_path, generator_dir):
    import numpy as np

    from ragpt.retrieval.query_adapter import QueryAdapter

    reg = PromptRegistry(tmp_path / "prompts")
    p = make_prompt(0)
    reg.register(SoftPrompt(p.tensor, {**p.meta, "contract": {"query_adapter": True}},
                            query_adapter=QueryAdapter(np.eye(8, dtype=np.float32))), actor="trainer")
    reg.register(make_prompt(1), actor="trainer")
    r = cli("export", "hr", "v1", str(tmp_path / "with"))
    assert r.exit_code == 0 and "cannot carry" in r.output, r.output
    assert (tmp_path / "with" / "adapter_model.safetensors").is_file()
    r = cli("export", "hr", "v2", str(tmp_path / "without"))
    assert r.exit_code == 0 and "query adapter" not in r.output, r.output
