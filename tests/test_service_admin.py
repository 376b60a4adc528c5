"""The admin API and the browser sessions, over HTTP (TestClient on the real app, real registry):
admin keys only, changes audited with the admin's name and in effect without a restart, the
release gate, cookie sessions with CSRF and origin checks, and the pages' security headers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from test_service import HR_Q, KEYS, MAX_TOKENS, _auth, _config, gen, settings  # noqa: F401 - gen, settings: fixtures

from ragpt.errors import ConfigError
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry
from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key
from ragpt_service.config import ServiceConfig
from ragpt_service.ui import CSP

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-key-alice"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
OPENAI = "/v1/chat/completions"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


@pytest.fixture
def registry_dir(settings, tmp_path):  # noqa: F811 - the imported fixture
    """A copy of the service tests' registry (hr v1 active, v2 approved, v3 draft) with a worse draft v4."""
    root = shutil.copytree(settings.prompt_dir, tmp_path / "prompts")
    return root


@pytest.fixture
def client(settings, real_embedder, gen, registry_dir):  # noqa: F811
    reg = PromptRegistry(registry_dir)
    hidden = gen.model.get_input_embeddings().weight.shape[1]
    verdict = {"verdict": "worse", "delta": -6.0, "low": -9.0, "high": -2.5, "n": 60, "step": 40}
    reg.register(SoftPrompt.create(torch.zeros(3, hidden), department="hr",
                                   base_fingerprint=base_model_fingerprint(gen.model),
                                   metrics={"dev_verdict": verdict}), actor="trainer")
    (registry_dir / "hr" / "v4" / "loss_curve.json").write_text(json.dumps(
        {"loss": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.9}], "evals": []}))
    s = settings.model_copy(update={"prompt_dir": registry_dir})
    config = _config(admin={"keys": {"alice": hash_api_key(ADMIN_KEY)}})
    with TestClient(create_app(config, s, embedder=real_embedder, generator=gen, background_load=False)) as c:
        yield c


def _ok_body(**more) -> dict:
    return {"model": "hr", "messages": [{"role": "user", "content": HR_Q}], "max_tokens": MAX_TOKENS, **more}


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------- who may use it


def test_the_admin_api_answers_admin_keys_only(client):
    for path in ("/admin/v1/departments", "/admin/v1/audit"):
        _error(client.get(path), 401, "invalid_api_key")
        _error(client.get(path, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
        for dept_key in KEYS:  # every department key, even one for all departments
            _error(client.get(path, headers=_auth(dept_key)), 403, "forbidden")
        assert client.get(path, headers=ADMIN).status_code == 200
    _error(client.post("/admin/v1/departments/hr/rollback", headers=_auth("all"), json={"reason": "x"}),
           403, "forbidden")


def test_an_admin_key_must_differ_from_department_and_metrics_keys():
    with pytest.raises((ConfigError, ValueError), match="admin key must not also be"):
        _config(admin={"keys": {"alice": hash_api_key(KEYS["hr"])}})
    with pytest.raises(ValueError, match="sha256 hex"):
        ServiceConfig.model_validate({"departments": {"hr": {}}, "admin": {"keys": {"alice": "plain-key"}}})


# --------------------------------------------------------------------------- reading


def test_departments_versions_and_details(client):
    body = client.get("/admin/v1/departments", headers=ADMIN).json()
    depts = {d["department"]: d for d in body["departments"]}
    assert set(depts) == {"hr", "it", "finance"} and depts["finance"]["versions"] == []
    hr = depts["hr"]
    assert hr["active"] == "v1"
    rows = {v["version"]: v for v in hr["versions"]}
    assert {v: r["state"] for v, r in rows.items()} == {"v1": "active", "v2": "approved", "v3": "draft", "v4": "draft"}
    assert rows["v4"]["dev_verdict"]["verdict"] == "worse" and rows["v1"]["dev_verdict"] is None
    assert rows["v1"]["contract"]["k"] == 2 and rows["v1"]["bytes"] > 0 and rows["v1"]["depth"] == 1
    d = client.get("/admin/v1/departments/hr/versions/v4", headers=ADMIN).json()
    assert d["loss_curve"] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.9}]
    assert d["registry"]["state"] == "draft" and d["registry"]["last_change"]["action"] == "register"
    _error(client.get("/admin/v1/departments/hr/versions/v9", headers=ADMIN), 404, "not_found")
    _error(client.get("/admin/v1/departments/nosuch/versions/v1", headers=ADMIN), 404, "not_found")
    audit = client.get("/admin/v1/audit?department=hr&last=2", headers=ADMIN).json()["records"]
    assert [r["action"] for r in audit] == ["activate", "register"]


# --------------------------------------------------------------------------- changing


def test_changes_need_a_reason_are_audited_with_the_admins_name_and_apply_at_once(client, registry_dir):
    before = client.post(OPENAI, headers=_auth("hr"), json=_ok_body()).json()
    assert before["prompt_version"] == "v1"
    _error(client.post("/admin/v1/departments/hr/versions/v2/activate", headers=ADMIN, json={"reason": "  "}),
           400, "reason_required")
    r = client.post("/admin/v1/departments/hr/versions/v2/activate", headers=ADMIN, json={"reason": "better on dev"})
    assert r.status_code == 200 and r.json() == {"department": "hr", "active": "v2"}
    # The running service answers with the new version: no restart, no reload call.
    assert client.post(OPENAI, headers=_auth("hr"), json=_ok_body()).json()["prompt_version"] == "v2"
    assert client.post("/admin/v1/departments/hr/rollback", headers=ADMIN,
                       json={"reason": "v2 cites the wrong policy"}).json()["active"] == "v1"
    assert client.post("/admin/v1/departments/hr/deactivate", headers=ADMIN,
                       json={"reason": "pause"}).json()["active"] is None
    assert client.post(OPENAI, headers=_auth("hr"), json=_ok_body()).json()["prompt_version"] is None
    last = PromptRegistry(registry_dir).audit("hr")[-3:]
    assert [(r["action"], r["actor"], r["reason"]) for r in last] == [
        ("activate", "alice", "better on dev"), ("rollback", "alice", "v2 cites the wrong policy"),
        ("deactivate", "alice", "pause")]


def test_the_release_gate_and_illegal_transitions_are_409s(client, registry_dir):
    err = _error(client.post("/admin/v1/departments/hr/versions/v4/approve", headers=ADMIN,
                             json={"reason": "looks fine"}), 409, "illegal_transition")
    assert "worse than no prompt" in err["message"]
    _error(client.post("/admin/v1/departments/hr/versions/v3/activate", headers=ADMIN, json={"reason": "x"}),
           409, "illegal_transition")
    r = client.post("/admin/v1/departments/hr/versions/v4/approve", headers=ADMIN,
                    json={"reason": "dev set is off-topic; test +3", "force": True})
    assert r.status_code == 200
    rec = PromptRegistry(registry_dir).audit("hr")[-1]
    assert (rec["action"], rec["actor"], rec["forced"]) == ("approve", "alice", True)
    _error(client.post("/admin/v1/departments/hr/versions/v4/approve", headers=ADMIN,
                       json={"reason": "x", "extra": 1}), 400, "invalid_request")


# --------------------------------------------------------------------------- browser sessions


def _session(client, key: str, kind: str = "department"):
    return client.post("/ui/session", json={"key": key, "kind": kind})


def test_a_department_key_becomes_an_httponly_session_used_with_its_csrf_token(client):
    _error(_session(client, "wrong"), 401, "invalid_api_key")
    _error(_session(client, ADMIN_KEY), 401, "invalid_api_key")  # an admin key is no department key
    r = _session(client, KEYS["itfin"])
    assert r.status_code == 200
    body = r.json()
    assert body["kind"] == "department" and body["departments"] == ["finance", "it"]
    cookie = r.headers["set-cookie"]
    assert "ragpt_chat=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert KEYS["itfin"] not in cookie
    csrf = {"X-CSRF-Token": body["csrf"]}
    assert client.get("/ui/session").json()["csrf"] == body["csrf"]  # after a reload, the page asks again

    ok = client.post(OPENAI, headers=csrf, json=_ok_body(model="it"))
    assert ok.status_code == 200 and ok.json()["department"] == "it"
    _error(client.post(OPENAI, headers=csrf, json=_ok_body(model="hr")), 404, "model_not_found")
    _error(client.post(OPENAI, json=_ok_body(model="it")), 403, "csrf_failed")  # no token
    _error(client.post(OPENAI, headers={**csrf, "Origin": "https://evil.example"}, json=_ok_body(model="it")),
           403, "csrf_failed")
    _error(client.get("/admin/v1/departments", headers=csrf), 401, "invalid_api_key")  # never an admin
    token = client.cookies.get("ragpt_chat")
    assert client.delete("/ui/session", headers=csrf).status_code == 204
    _error(client.post(OPENAI, headers=csrf, json=_ok_body(model="it")), 401, "invalid_api_key")  # cookie gone
    client.cookies.set("ragpt_chat", token)  # and a copy of it kept elsewhere is dead on the server too
    _error(client.post(OPENAI, headers=csrf, json=_ok_body(model="it")), 401, "session_expired")


def test_an_admin_session_drives_the_admin_api_and_a_department_key_cannot_open_one(client):
    _error(_session(client, KEYS["all"], "admin"), 403, "forbidden")
    r = _session(client, ADMIN_KEY, "admin")
    assert r.status_code == 200 and r.json()["admin"] == "alice"
    csrf = {"X-CSRF-Token": r.json()["csrf"]}
    assert client.get("/admin/v1/departments", headers=csrf).status_code == 200
    _error(client.post("/admin/v1/departments/hr/rollback", json={"reason": "x"}), 403, "csrf_failed")
    _error(client.post(OPENAI, headers=csrf, json=_ok_body(model="it")), 401, "invalid_api_key")  # no chat


def test_pages_are_served_with_a_content_security_policy(client):
    assert client.get("/", follow_redirects=False).headers["location"] == "/chat"
    for path in ("/chat", "/chat/hr", "/console"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP and r.headers["x-frame-options"] == "DENY"
        assert "<script" not in r.text.replace('<script type="module" src="/static/', "")  # no inline scripts
        assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
    js = client.get("/static/chat.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/ui/session").headers["cache-control"] == "no-store"
    assert "/admin/v1/departments/{dept}/versions/{version}/approve" in client.get("/openapi.json").json()["paths"]
