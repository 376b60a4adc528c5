"""The chat page and the release console in a real browser: headless Chromium (Debian's package,
through its chromedriver) against a live uvicorn on 127.0.0.1 serving the tiny generator.

Skips when no chromedriver is installed, unless RAGPT_REQUIRE_BROWSER=1 (CI), where it fails.
With RAGPT_SCREENSHOTS=<folder> it saves screenshots of both pages there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, live_server, write

from ragpt.data.ingest import ingest
from ragpt.data.sample import department_dir
from ragpt.lm.generator import Generator
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest, Turn
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry
from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key
from ragpt_service.config import ServiceConfig

pytestmark = pytest.mark.integration

HR_KEY, ADMIN_KEY = "browser-hr-key", "browser-admin-key"
SCRIPT_DOC = ("Badge Policy\n\nVisitor badges are printed at the front desk. "
              "<script>window.__ragpt_pwned = 1</script> Badges expire at midnight.\n")
QUESTION = "When do visitor badges expire?"
FOLLOW_UP = "Where are they printed?"
TIMEOUT_S = 60


def _driver_or_skip():
    chromedriver = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not (chromedriver and browser):
        if os.environ.get("RAGPT_REQUIRE_BROWSER") == "1":
            pytest.fail("RAGPT_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed")
        pytest.skip("no chromium + chromedriver (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                "--disable-gpu"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=opts)


@pytest.fixture(scope="module")
def served(tiny_tokenizer, real_embedder, tmp_path_factory):
    """A live service: hr (the sample corpus + a document with a script tag) with v1 active and v2
    approved, an admin key; yields (url, pipeline for expected answers)."""
    tmp = tmp_path_factory.mktemp("browser")
    docs = tmp / "docs"
    shutil.copytree(department_dir("hr"), docs / "hr")
    write(docs / "hr" / "badge-policy.txt", SCRIPT_DOC)
    from ragpt.config import Settings

    settings = Settings(index_dir=tmp / "indexes", prompt_dir=tmp / "prompts", cache_dir=tmp / "cache",
                        max_context_tokens=3000, max_new_tokens=12, k=2)
    ingest(settings.index_dir, "web", [docs / "hr"], ["hr"], real_embedder, source_root=docs, progress=False)
    model = build_tiny_model(tiny_tokenizer)
    gen = Generator(model, tiny_tokenizer)
    reg = PromptRegistry(settings.prompt_dir)
    hidden = model.get_input_embeddings().weight.shape[1]
    for seed in (1, 2):
        t = torch.randn(3, hidden, generator=torch.Generator().manual_seed(seed))
        v = reg.register(SoftPrompt.create(t, department="hr", base_fingerprint=base_model_fingerprint(model)),
                         actor="trainer")
        reg.approve("hr", v, actor="reviewer")
    reg.activate("hr", "v1", actor="reviewer")
    config = ServiceConfig.model_validate({
        "index": "web", "departments": {"hr": {"api_keys": [hash_api_key(HR_KEY)]}},
        "limits": {"max_tokens": 12}, "admin": {"keys": {"carol": hash_api_key(ADMIN_KEY)}}})
    app = create_app(config, settings, embedder=real_embedder, generator=gen, background_load=False)
    pipe = Pipeline(DocumentIndex.open(settings.index_dir, "web"), settings, embedder=real_embedder, generator=gen)
    with live_server(app) as url:
        yield url, pipe


@pytest.fixture(scope="module")
def browser():
    driver = _driver_or_skip()
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The pages re-render lists after each change: an element found a moment ago may be replaced.
    wait = WebDriverWait(driver, TIMEOUT_S, ignored_exceptions=(StaleElementReferenceException,
                                                                NoSuchElementException))
    return wait.until(condition, message=f"timed out waiting for {what}")


def _by(sel: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, sel


def _visible(driver, sel: str):
    from selenium.webdriver.support import expected_conditions as ec

    return _wait(driver, ec.visibility_of_element_located(_by(sel)), sel)


def _ask(driver, text: str) -> None:
    box = _visible(driver, "#message")
    box.clear()
    box.send_keys(text)
    n = len(driver.find_elements(*_by(".msg.assistant")))
    driver.find_element(*_by("#send")).click()
    # Finished: a new assistant message whose stop button is no longer enabled.
    _wait(driver, lambda d: len(d.find_elements(*_by(".msg.assistant"))) == n + 1
          and not d.find_element(*_by("#stop")).is_enabled(), "the streamed answer")


def _answers(driver) -> list:
    return driver.find_elements(*_by(".msg.assistant"))


def _login(driver, form_input: str, submit: str, key: str) -> None:
    box = _visible(driver, form_input)
    box.clear()
    box.send_keys(key)
    driver.find_element(*_by(submit)).click()


def _shot(driver, name: str) -> None:
    folder = os.environ.get("RAGPT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def test_chat_page_streams_answers_with_citations_follow_ups_and_escapes_document_text(browser, served):
    url, pipe = served
    browser.get(f"{url}/chat/hr")
    _login(browser, "#key-input", "#key-submit", "wrong-key")
    assert "not valid" in _visible(browser, "#key-error").text.lower() or \
        "invalid" in browser.find_element(*_by("#key-error")).text.lower()
    _login(browser, "#key-input", "#key-submit", HR_KEY)
    _visible(browser, "#chat-form")
    assert HR_KEY not in browser.current_url

    _ask(browser, QUESTION)
    first = _answers(browser)[-1]
    expected = pipe.ask_many([ChatRequest(QUESTION, "hr")])[0]
    assert first.find_element(*_by(".answer-text")).text.strip() == expected.text.strip()
    assert "v1" in first.find_element(*_by('[data-testid="prompt-version"]')).text
    cites = first.find_elements(*_by(".citations li"))
    assert len(cites) == len(expected.citations) > 0
    assert "hr/badge-policy.txt" in cites[0].text
    # The document's script tag is shown as text and never runs.
    assert "<script>window.__ragpt_pwned = 1</script>" in " ".join(c.text for c in cites)
    assert browser.execute_script("return window.__ragpt_pwned === undefined")

    _ask(browser, FOLLOW_UP)  # the same conversation: the first turn goes along as history
    second = _answers(browser)[-1]
    history = (Turn("user", QUESTION), Turn("assistant", expected.text))
    want = pipe.ask_many([ChatRequest(FOLLOW_UP, "hr", history=history)])[0]
    assert second.find_element(*_by(".answer-text")).text.strip() == want.text.strip()
    assert len(browser.find_elements(*_by(".msg.user"))) == 2
    _shot(browser, "chat.png")
    # No script error and no content-security-policy violation (the 401s of the wrong key and of
    # the first session probe are the network's, and expected).
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert not severe, severe


def test_console_activates_a_version_and_the_chat_answers_with_it(browser, served):
    url, _ = served
    browser.get(f"{url}/console")
    _login(browser, "#admin-key-input", "#admin-key-submit", HR_KEY)  # a department key is refused
    _wait(browser, lambda d: d.find_element(*_by("#admin-key-error")).text.strip(), "the refusal")
    _login(browser, "#admin-key-input", "#admin-key-submit", ADMIN_KEY)
    row = _visible(browser, 'section[data-dept="hr"] tr[data-version="v2"]')
    assert "approved" in row.text
    row.find_element(*_by('[data-action="activate"]')).click()
    _visible(browser, "#action-dialog")
    browser.find_element(*_by("#reason")).send_keys("browser test: v2 reviewed")
    browser.find_element(*_by("#action-confirm")).click()
    _wait(browser, lambda d: "active" in d.find_element(*_by('section[data-dept="hr"] tr[data-version="v2"]')).text,
          "v2 active in the console")
    _wait(browser, lambda d: "browser test: v2 reviewed" in d.find_element(*_by("#audit")).text
          and "carol" in d.find_element(*_by("#audit")).text, "the audit line with the admin's name")
    _shot(browser, "console.png")

    browser.get(f"{url}/chat/hr")  # the department session is still there: no key asked again
    _visible(browser, "#chat-form")
    _ask(browser, QUESTION)
    assert "v2" in _answers(browser)[-1].find_element(*_by('[data-testid="prompt-version"]')).text
