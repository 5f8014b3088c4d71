"""The web chat page in a real browser: headless Debian Chromium driven by selenium, the server on 127.0.0.1.

The model is scripted to answer 'Hello world world ...' forever and the engine is gated step by step, so the
test sees the answer grow token by token, and the stop button end it while it still runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import List

import pytest

import serve_support  # noqa: E402,F401  (first: it keeps Gradio offline)

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e \".[serve]\"")
if importlib.util.find_spec("gradio") is None:  # found, not imported: every test process collects this file, and
    pytest.skip("gradio is not installed: pip install -e \".[web]\"",  # only the one that runs it needs gradio (~2 s)
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e \".[test]\"")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (ElementNotInteractableException,  # noqa: E402
                                        StaleElementReferenceException, WebDriverException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from helpers import TOKENIZER  # noqa: E402
from llama import Llama  # noqa: E402
from serve_support import TIMEOUT, ThreadServer, noticed, wait_until  # noqa: E402
from test_streaming import HELLO, WORLD, scripted_checkpoint  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Chromium and its driver are not installed: apt-get install chromium chromium-driver",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium's own usage statistics: off
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    except WebDriverException as err:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium does not start here: {err.msg}")
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def looping(tmp_path_factory) -> Llama:
    folder = scripted_checkpoint(tmp_path_factory.mktemp("loop"), {None: [HELLO, WORLD, WORLD]})
    return Llama.build(str(folder), str(TOKENIZER), max_seq_len=256, max_batch_size=2, device="cpu",
                       dtype="float32")


def bot_messages(browser) -> List[str]:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')]


def wait_for_answer(browser, index: int, text: str) -> None:
    wait_until(lambda: bot_messages(browser)[index:index + 1] == [text],
               f"answer {index} to read {text!r} (it reads {bot_messages(browser)[index:index + 1]})")


def send(browser, text: str) -> None:
    """Type a message and press Enter, once the box takes input (Gradio covers it while an event finishes)."""
    def typed() -> bool:
        try:
            box = browser.find_element(By.CSS_SELECTOR, "#message textarea")
            box.send_keys(text)
        except (ElementNotInteractableException, StaleElementReferenceException):
            return False
        box.send_keys(Keys.ENTER)
        return True

    wait_until(typed, "the message box to take input", every=0.1)


def test_page_streams_keeps_the_conversation_and_stops(browser, looping):
    prompts: List[str] = []
    with ThreadServer(looping, model="loop", web=True) as server:
        submit = server.engine.submit
        server.engine.submit = lambda request: prompts.append(looping.tokenizer.decode(request.prompt)) or \
            submit(request)
        server.gate.allow(0)  # nothing runs until the test says so
        browser.get(server.url + "/web/")
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#message textarea"), "the page to load")
        system = browser.find_element(By.CSS_SELECTOR, "#system-prompt textarea")
        system.send_keys("Be brief.")
        send(browser, "Say hello")
        server.gate.allow(3)  # the prefill and two decode steps: three tokens
        wait_for_answer(browser, 0, "Hello world world")
        server.gate.allow(2)  # two more tokens appear in the same answer: it streams
        wait_for_answer(browser, 0, "Hello world world world world")
        assert server.engine.stats()["running"] == 1
        browser.find_element(By.CSS_SELECTOR, "#message button.stop-button").click()
        noticed(server, 1)  # the stop button cancelled the request (its row is freed)
        server.gate.allow(None)
        server.wait_idle()
        assert server.engine.finished["cancelled"] == 1
        assert bot_messages(browser) == ["Hello world world world world"]  # nothing more arrived
        # The conversation goes on with its history and the system prompt.
        server.gate.allow(2)
        send(browser, "Again")
        wait_for_answer(browser, 1, "Hello world")
        browser.find_element(By.CSS_SELECTOR, "#message button.stop-button").click()
        noticed(server, 2)
        server.gate.allow(None)
        server.wait_idle()
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        browser.get("about:blank")  # closes the page's connections, so the server stops at once
    assert len(prompts) == 2
    assert "<<SYS>>\nBe brief.\n<</SYS>>\n\nSay hello [/INST]" in prompts[0]
    assert "Say hello [/INST] Hello world world world world" in prompts[1] and prompts[1].endswith("Again [/INST]")
    outside = [url for url in resources if not url.startswith(server.url)]
    assert not outside, f"the page fetched from elsewhere than the server: {outside}"
