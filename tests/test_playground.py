"""The web playground in a real browser: headless Debian Chromium driven by Selenium loads
``/``, sends a chat message and sees the streamed reply appear.

Needs /usr/bin/chromium and chromedriver (Debian's ``chromium`` and ``chromium-driver``, which
``make setup`` installs when apt is available); skipped with the reason otherwise. Selenium is
pointed at that chromedriver explicitly, so Selenium Manager never tries to download a browser.
"""
from __future__ import annotations

import os
import shutil
import string
import time

import pytest
import torch

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and os.path.exists(p)), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless browser test needs Debian's chromium + chromium-driver "
           "(apt-get install chromium chromium-driver; `make setup` does it when apt is available)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from polymodal.models.gpt import GPTConfig
    from polymodal.models.registry import build_model
    from polymodal.serve.app import create_app
    from polymodal.serve.server import ServerThread
    from polymodal.serve.models import ServedModel
    from polymodal.tokenizers import train_char_tokenizer

    # no EOS token: the reply always runs to max_tokens, so there is something to stream
    tok = train_char_tokenizer(string.ascii_letters + string.digits + " .,!?\n")
    tok = type(tok).from_tokenizers(tok.backend, chat_template=(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"))
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_preset("nano-llama", vocab_size=tok.vocab_size, block_size=256,
                                              init_std=0.5)).eval()
    app = create_app([ServedModel.from_model("tiny", model, tok)])
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-dev-shm-usage", "--no-first-run", "--window-size=1200,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(fn, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_playground_chat_streams(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    _wait(lambda: browser.execute_script("return document.body.dataset.ready === '1'"))
    assert browser.find_element(By.ID, "chat-model").get_attribute("value") == "tiny"
    # no VLM and no CLIP are served: the panels say so
    assert browser.find_element(By.ID, "vision-none").is_displayed()
    assert browser.find_element(By.ID, "search-none").is_displayed()
    # Record every change of the reply bubble, to see the text arrive in several pieces.
    browser.execute_script("""
        window.__seen = [];
        new MutationObserver(() => {
          const m = document.querySelectorAll('#messages .msg.assistant');
          if (m.length) window.__seen.push(m[m.length - 1].textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("40")
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "prompt").send_keys("Hello there")
    browser.find_element(By.ID, "send").click()
    _wait(lambda: "chunks in" in browser.find_element(By.ID, "chat-status").text)
    reply = browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")[-1].text
    seen = browser.execute_script("return window.__seen")
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")[-1].text == "Hello there"
    # the same greedy text as the API gives
    import httpx
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 40,
        "temperature": 0}).json()
    assert reply == r["choices"][0]["message"]["content"].strip() and reply
    partial = {s for s in seen if s and s != seen[-1]}
    assert len(partial) >= 2, f"the reply did not stream (saw {seen!r})"
