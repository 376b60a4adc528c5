"""Screenshots of the chat page and the release console for the docs, with the embedded models.

Serves the sample index and the registry in prompts/ (hr's shipped prompt) with `ragpt serve`'s
app on 127.0.0.1, asks hr a question in headless Chromium, opens the console, and writes
docs/images/chat.png and docs/images/console.png. Needs chromium + chromium-driver and the
index "sample" (`./run demo` builds it).

    .venv/bin/python benchmarks/screenshots.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT / "tests"))

QUESTIONS = ["How many days of paid vacation do full-time employees in Munich get?",
             "Can I carry unused days over to next year?"]


def main() -> None:
    from conftest import live_server
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from ragpt.config import load_settings
    from ragpt_service.app import create_app
    from ragpt_service.auth import hash_api_key
    from ragpt_service.config import ServiceConfig

    # A copy of the registry: the console's screenshot must not change the shipped audit log.
    prompts = Path(tempfile.mkdtemp(prefix="ragpt-shots-")) / "prompts"
    shutil.copytree(ROOT / "prompts", prompts)
    settings = load_settings(prompt_dir=prompts, index_dir=ROOT / "indexes", max_new_tokens=48)
    config = ServiceConfig.model_validate({
        "index": "sample",
        "departments": {d: {"api_keys": [hash_api_key("demo-key")]} for d in ("hr", "it", "finance")},
        "admin": {"keys": {"compliance": hash_api_key("demo-admin-key")}}})
    app = create_app(config, settings, background_load=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    wait = WebDriverWait(driver, 300)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        with live_server(app) as url:
            driver.get(f"{url}/chat/hr")
            wait.until(ec.visibility_of_element_located((By.ID, "key-input"))).send_keys("demo-key")
            driver.find_element(By.ID, "key-submit").click()
            for i, q in enumerate(QUESTIONS, 1):
                box = wait.until(ec.visibility_of_element_located((By.ID, "message")))
                box.send_keys(q)
                driver.find_element(By.ID, "send").click()
                wait.until(lambda d, i=i: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == i
                           and not d.find_element(By.ID, "stop").is_enabled())
            time.sleep(0.5)
            driver.save_screenshot(str(OUT / "chat.png"))
            driver.get(f"{url}/console")
            wait.until(ec.visibility_of_element_located((By.ID, "admin-key-input"))).send_keys("demo-admin-key")
            driver.find_element(By.ID, "admin-key-submit").click()
            wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, 'section[data-dept="hr"]')))
            time.sleep(0.5)
            driver.save_screenshot(str(OUT / "console.png"))
    finally:
        driver.quit()
    print(f"wrote {OUT / 'chat.png'} and {OUT / 'console.png'}")


if __name__ == "__main__":
    main()
