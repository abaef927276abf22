"""The web playground in a real browser: headless Debian Chromium driven by Selenium loads
``/``, sends a chat message and sees the streamed reply appear; the shipped Markdown renderer
builds safe DOM (no HTML from the model); a long unbroken string does not widen the page;
the system prompt, top_p and copy buttons work; image search shows its images when the server
requires an API key (issue 14 defects 10 and 13).

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


LONG_NAME = "tiny-clip-with-a-rather-long-descriptive-model-name"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A CLIP model and an image folder (one file unreadable) behind an API key."""
    from PIL import Image

    from polymodal.serve.app import create_app
    from polymodal.serve.models import ServedModel
    from polymodal.serve.server import ServerThread
    from test_serve import _tiny_clip

    images = tmp_path_factory.mktemp("images")
    for i, c in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250)]):
        Image.new("RGB", (24, 24), c).save(images / f"im{i}.png")
    (images / "bad.png").write_bytes(b"not a png")
    clip = _tiny_clip()
    app = create_app([ServedModel.from_model(LONG_NAME, clip.model, clip.tokenizer)], api_key="sekret",
                     image_dir=str(images))
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


def _open(browser, url):
    browser.get(url + "/")
    _wait(lambda: browser.execute_script("return document.body.dataset.ready === '1'"))


def _send(browser, text, max_tokens="20"):
    from selenium.webdriver.common.by import By

    n = len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant"))
    for fid, v in (("max-tokens", max_tokens), ("temperature", "0")):
        browser.find_element(By.ID, fid).clear()
        browser.find_element(By.ID, fid).send_keys(v)
    browser.execute_script("document.getElementById('prompt').value = arguments[0];", text)
    browser.find_element(By.ID, "send").click()
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")) > n
          and "chunks in" in browser.find_element(By.ID, "chat-status").text)


def test_playground_chat_streams(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    assert browser.find_element(By.ID, "chat-model").get_attribute("value") == "tiny"
    assert not browser.find_element(By.CSS_SELECTOR, "#chat-panel .model-full").is_displayed()  # "tiny" fits
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


def test_markdown_is_rendered_safely(server, browser):
    """The renderer shipped in the package (static/markdown.js) turns Markdown into elements and
    leaves any HTML the model writes as text: no element, no handler, no javascript: link."""
    _open(browser, server.url)
    got = browser.execute_script("""
        window.__xss = 0;
        const d = document.createElement('div');
        renderMarkdown(arguments[0], d);
        document.body.appendChild(d);
        return {html: d.innerHTML, h: d.querySelectorAll('h3').length, code: d.querySelector('pre code').textContent,
                lang: d.querySelector('pre code').dataset.lang, strong: d.querySelector('strong').textContent,
                em: d.querySelector('em').textContent, li: [...d.querySelectorAll('ol li')].map(x => x.textContent),
                links: [...d.querySelectorAll('a')].map(a => a.href), imgs: d.querySelectorAll('img, script').length,
                inline: d.querySelector('p code').textContent, text: d.textContent};
    """, "# Title\nSome **bold** and *it* with `x = 1`.\n\n```python\nprint('<b>hi</b>')\n```\n"
         "1. one\n2. two\n\n[ok](https://example.com/a) [bad](javascript:window.__xss=1) "
         "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=1</script>")
    assert got["h"] == 1 and got["strong"] == "bold" and got["em"] == "it" and got["inline"] == "x = 1"
    assert got["code"] == "print('<b>hi</b>')" and got["lang"] == "python" and got["li"] == ["one", "two"]
    assert got["links"] == ["https://example.com/a"] and got["imgs"] == 0
    assert "<img src=x" in got["text"] and "javascript:" in got["text"]
    assert browser.execute_script("return window.__xss") == 0
    # a streamed reply is rendered through it (paragraph elements, raw text kept for copying)
    _send(browser, "hi")
    last = browser.execute_script("const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();"
                                  "return [m.querySelectorAll('p, ul, ol, pre, h3').length, m.dataset.raw];")
    assert last[0] >= 1 and last[1]


def test_long_unbroken_string_keeps_the_page_width(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    _send(browser, "a" + " b" * 20)
    n = len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg.error"))
    browser.execute_script("document.getElementById('prompt').value = arguments[0];", "x" * 3000)
    browser.find_element(By.ID, "send").click()  # longer than the context: the reply is an error bubble
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg.error")) > n)
    browser.execute_script("const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();"
                           "renderMarkdown('y'.repeat(3000) + ' `' + 'z'.repeat(2000) + '`', m);")
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width


def test_system_prompt_top_p_and_copy(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server.url)
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url,
                            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.execute_script("""
        window.__bodies = [];
        const f = window.fetch;
        window.fetch = (url, opts) => { if (opts && opts.body) window.__bodies.push(JSON.parse(opts.body)); return f(url, opts); };
    """)
    browser.find_element(By.CSS_SELECTOR, "#system-box summary").click()
    browser.find_element(By.ID, "system-prompt").send_keys("Be brief.")
    browser.find_element(By.ID, "top-p").clear()
    browser.find_element(By.ID, "top-p").send_keys("0.5")
    _send(browser, "hello")
    body = browser.execute_script("return window.__bodies.pop()")
    assert body["messages"][0] == {"role": "system", "content": "Be brief."} and body["top_p"] == 0.5
    assert body["messages"][1] == {"role": "user", "content": "hello"}
    browser.find_elements(By.CSS_SELECTOR, "#messages .turn.assistant .tools .copy")[-1].click()
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .turn.assistant .tools .copy")[-1].text != "Copy")
    clip = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('ERR ' + e))")
    raw = browser.execute_script("return [...document.querySelectorAll('#messages .msg.assistant')].pop().dataset.raw")
    assert clip == raw and raw


def test_image_search_with_api_key(keyed_server, browser):
    """With --api-key the images load (fetched with the key, shown as blob: URLs), the unreadable
    file is reported as skipped, and the long model name is shown whole."""
    from selenium.webdriver.common.by import By

    browser.get(keyed_server.url + "/")
    _wait(lambda: "Error" in browser.find_element(By.ID, "chat-status").text)  # no key yet: 401
    browser.execute_script("localStorage.setItem('polymodal-api-key', 'sekret')")
    _open(browser, keyed_server.url)
    browser.find_element(By.ID, "search-query").send_keys("a red square")
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    _wait(lambda: browser.execute_script(
        "const im = [...document.querySelectorAll('#search-results img')];"
        "return im.length === 3 && im.every(i => i.complete && i.naturalWidth === 24);"))
    srcs = browser.execute_script("return [...document.querySelectorAll('#search-results img')].map(i => i.src)")
    assert all(s.startswith("blob:") for s in srcs)
    assert "1 unreadable" in browser.find_element(By.ID, "search-status").text
    # the name is longer than the panel is wide: the select keeps to the panel and the full name
    # is shown under it, wrapped
    shown = browser.execute_script("""
        const s = document.getElementById('search-model'), full = s.parentElement.querySelector('.model-full');
        return [s.value, full ? full.textContent : null, full ? full.offsetParent !== null : false,
                document.documentElement.scrollWidth <= window.innerWidth];
    """)
    assert shown == [LONG_NAME, LONG_NAME, True, True], shown
    browser.execute_script("localStorage.removeItem('polymodal-api-key')")
