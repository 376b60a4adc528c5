"""Schemathesis against the service's own OpenAPI document, on the ASGI app directly.

Every documented operation gets a bounded, deterministic property-based run (a fixed number of
examples, a fixed seed, no example database, a deadline per example), with a valid API key,
from data that fits the schema (positive) and data that does not (negative). Each response must
not be a server error, must carry a documented status code and content type, and must match the
documented response schema (every error is an ErrorBody).

Generated chat requests are mostly refused (a model no department has, the last message not the
user's, an unsupported parameter): about half of the positive examples are steered into requests
a department answers (a real department, `auto` or a pinned version, one user message, the
generated options within the service's limits), so that retrieval and generation are fuzzed too.
The tiny generator, the real embedder and the sample index, as tests/test_service.py.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from conftest import build_tiny_model

schemathesis = pytest.importorskip("schemathesis")  # dev dependency: schemathesis>=4.32 (pyproject dev extra)

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ragpt.lm.generator import Generator  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint  # noqa: E402
from ragpt.softprompts.registry import PromptRegistry  # noqa: E402
from ragpt_service.app import create_app  # noqa: E402
from ragpt_service.auth import hash_api_key  # noqa: E402
from ragpt_service.config import ServiceConfig  # noqa: E402

pytestmark = pytest.mark.integration  # real embedder and sample index

KEY = "fuzz-key-all-departments"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 50
SEED = 20240611
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
OPERATIONS = ["GET /healthz", "GET /readyz", "GET /v1/models", "POST /v1/chat/completions",
              "POST /v1/departments/{dept}/chat", "POST /v1/prompt_embeds"]
ADMIN_KEY = "fuzz-admin-key"
# The browser session exchange and the admin API, fuzzed with the admin key: generated changes are
# mostly refused (an unknown version, an illegal transition), which is what they must survive.
ADMIN_OPERATIONS = ["POST /ui/session", "GET /ui/session", "DELETE /ui/session", "GET /admin/v1/departments",
                    "GET /admin/v1/departments/{dept}/versions/{version}", "GET /admin/v1/audit",
                    "POST /admin/v1/departments/{dept}/versions/{version}/approve",
                    "POST /admin/v1/departments/{dept}/versions/{version}/activate",
                    "POST /admin/v1/departments/{dept}/rollback", "POST /admin/v1/departments/{dept}/deactivate"]
# What a steered request names.
MODELS = ["hr", "it", "finance", "auto", "hr@v1", "hr@none", "it@v1", "hr@v9", "legal"]
DEPARTMENTS = ["hr", "it", "finance", "legal"]
QUESTIONS = ["How many vacation days do I get?", "How do I connect to the VPN from home?",
             "Who approves an invoice above 10,000 EUR?"]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    return Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)


@pytest.fixture(scope="module")
def app(sample_index, gen, real_embedder, tmp_path_factory):
    """hr and it have an active v1; finance has no soft prompts."""
    s, _ = sample_index
    reg = PromptRegistry(tmp_path_factory.mktemp("prompts"))
    emb = gen.model.get_input_embeddings().weight
    for i, dept in enumerate(("hr", "it")):
        t = torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(3 + i)) * float(emb.std())
        v = reg.register(SoftPrompt.create(t, department=dept, base_fingerprint=base_model_fingerprint(gen.model)),
                         actor="test")
        reg.approve(dept, v, actor="test")
        reg.activate(dept, v, actor="test")
    s = s.model_copy(update={"prompt_dir": reg.root, "max_context_tokens": 2048, "k": 2})
    digest = hash_api_key(KEY)
    config = ServiceConfig.model_validate({
        "index": "sample",
        "departments": {d: {"api_keys": [digest]} for d in ("hr", "it", "finance")},
        # Small answers keep a generated request fast; a larger max_tokens is a documented 400.
        "limits": {"max_tokens": 16, "default_max_tokens": 8, "request_timeout_s": 30},
        "admin": {"keys": {"fuzzer": hash_api_key(ADMIN_KEY)}},
    })
    return create_app(config, s, embedder=real_embedder, generator=gen, background_load=False)


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_fuzzed_operations_are_all_the_documented_ones(schema):
    labels = sorted(op.ok().label for op in schema.get_all_operations())
    assert labels == sorted(OPERATIONS + ADMIN_OPERATIONS)


# Generated fields kept in a steered request; values over a service limit are brought within it.
KEPT = ("temperature", "stream", "stream_options", "user", "metadata", "max_tokens", "max_completion_tokens", "k")
LIMITS = {"max_tokens": 16, "max_completion_tokens": 16, "k": 10}


def _steer(case, model: str, dept: str, question: str) -> None:
    """Turn a generated (schema-valid) request into one a department answers: a real department
    (or `auto`, a pinned version), one user message, the other generated fields within the limits."""
    if case.path_parameters and "dept" in case.path_parameters:
        case.path_parameters["dept"] = dept
    if not isinstance(case.body, dict) or "messages" not in case.body:
        return
    body = {name: case.body[name] for name in KEPT if name in case.body}
    for name, limit in LIMITS.items():
        if isinstance(body.get(name), int) and not isinstance(body[name], bool):
            body[name] = min(body[name], limit)
    body["messages"] = [{"role": "user", "content": question}]
    if "model" in case.body:
        body["model"] = model
    case.body = body


def _is_event_stream(response) -> bool:
    return response.headers.get("content-type", [""])[0].startswith("text/event-stream")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("label", OPERATIONS + ADMIN_OPERATIONS)
def test_schemathesis_finds_no_server_error_and_no_undocumented_response(schema, label, mode):
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    if mode is GenerationMode.NEGATIVE and not (operation.body or operation.path_parameters):
        pytest.skip(f"{label} takes no input: nothing to make invalid")
    if mode is GenerationMode.NEGATIVE and label in ADMIN_OPERATIONS and not (operation.body or operation.query):
        pytest.skip(f"{label} takes only free-text path segments: nothing to make invalid")
    seen: list[int] = []
    started = time.monotonic()

    @seed(SEED)  # the same examples on every run, whatever the test's source (derandomize hashes it)
    @settings(max_examples=MAX_EXAMPLES, database=None, deadline=timedelta(seconds=30),
              phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), steer=st.booleans(), model=st.sampled_from(MODELS),
           dept=st.sampled_from(DEPARTMENTS),
           question=st.one_of(st.sampled_from(QUESTIONS), st.text(min_size=1, max_size=300)))
    def run(case, steer, model, dept, question):
        if steer and mode is GenerationMode.POSITIVE:
            _steer(case, model, dept, question)
        headers = AUTH if label in OPERATIONS else {"Authorization": f"Bearer {ADMIN_KEY}"}
        response = case.call(headers=headers)
        seen.append(response.status_code)
        # A streamed answer's content type is undocumented: test_a_streamed_answer_has_a_documented_content_type.
        checks = [c for c in CHECKS if not (c is content_type_conformance and _is_event_stream(response))]
        case.validate_response(response, checks=checks, headers=headers)

    run()
    assert seen, "no request was sent"
    assert time.monotonic() - started < 300  # bounded: max_examples requests, each with a timeout
    if mode is GenerationMode.POSITIVE and label.startswith("POST") and label in OPERATIONS:
        assert 200 in seen, f"no generated request was answered: {sorted(set(seen))}"


class UndocumentedContentType(AssertionError):
    """Schemathesis' content_type_conformance failed (and only it)."""


STREAMED = [
    ("POST /v1/chat/completions", {}, {"model": "hr", "stream": True, "max_tokens": 4,
                                       "stream_options": {"include_usage": True}}),
    ("POST /v1/departments/{dept}/chat", {"dept": "it"}, {"stream": True, "max_tokens": 4}),
]


@pytest.mark.parametrize("label, path_parameters, body", STREAMED, ids=[s[0] for s in STREAMED])
def test_a_streamed_answer_has_a_documented_content_type(schema, label, path_parameters, body):
    operation = schema.find_operation_by_label(label)
    case = operation.Case(path_parameters=path_parameters or None, media_type="application/json",
                          body={**body, "messages": [{"role": "user", "content": QUESTIONS[0]}]})
    response = case.call(headers=AUTH)
    assert response.status_code == 200 and _is_event_stream(response), response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    # Everything else about the streamed answer conforms ...
    case.validate_response(response, checks=[c for c in CHECKS if c is not content_type_conformance], headers=AUTH)
    # ... but its content type is not documented.
    try:
        case.validate_response(response, checks=[content_type_conformance], headers=AUTH)
    except FailureGroup as group:
        raise UndocumentedContentType(str(group)) from None
