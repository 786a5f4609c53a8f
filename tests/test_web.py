"""genjo-fast web in a real browser: Debian's chromium, headless, driven by selenium through the
system chromedriver (nothing is downloaded). The app is started as a user starts it
(``python -m genjo_fast.cli web``); the page is used as a person uses it: type, click, read.

The tiny random checkpoint's answers are compared with the same model's answers computed in
this process. With genjo_fast.zoo's trained ``tiny-chat`` installed, the last test asks it a
question and checks its answer: ``GENJO_FAST_WEB_QUESTION`` / ``GENJO_FAST_WEB_ANSWER``
(default ``Sort: 3 1 2`` -> ``1 2 3``). ``GENJO_FAST_WEB_SCREENSHOT=PATH`` also saves a
screenshot of that page while the answer denoises (how ``docs/web-app.png`` is made).
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from genjo_fast.chat import Conversation, Settings, load_chat_model

from chat_helpers import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytest.importorskip("gradio", reason="the web app needs the app extra: pip install '.[app]'")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="the browser test needs selenium (the app extra)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver on PATH (Debian: apt-get install chromium "
           "chromium-driver; .ci/run installs them)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``genjo-fast web`` in a subprocess, on a free loopback port."""

    def __init__(self, *flags, timeout=240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "genjo_fast.cli", "web", "--port", str(self.port),
             "--threads", "1", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.output = []
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                self.output.append(line)
                if "Running on" in line:
                    ready.set()
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("genjo-fast web did not start:\n" + "".join(self.output))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(service=service, options=options)


class Page:
    """The app's page, as a person uses it."""

    def __init__(self, driver, url, timeout=180):
        self.driver = driver
        self.timeout = timeout
        driver.get(url)
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"))

    def wait(self, condition, timeout=None):
        """Waits for ``condition``; elements re-rendered while it reads them (stale) count as
        not yet."""
        from selenium.common.exceptions import StaleElementReferenceException
        return WebDriverWait(self.driver, timeout or self.timeout,
                             ignored_exceptions=(StaleElementReferenceException,)
                             ).until(condition)

    def text(self, element_id):
        """The text of a Markdown output (without Gradio's progress overlay)."""
        return self.driver.find_element(
            By.CSS_SELECTOR, f"#{element_id} [data-testid='markdown']").text.strip()

    def ask(self, message):
        """Sends ``message`` and waits for the page to settle: a new answer with its stats, or
        a new message in the status line (the tests never expect the same one twice in a
        row). Returns ``(bot messages, stats, status)``."""
        bots, stats, status = len(self.bot_messages()), self.text("stats"), self.text("status")
        box = self.driver.find_element(By.CSS_SELECTOR, "#message textarea")
        box.clear()
        box.send_keys(message)
        self.driver.find_element(By.ID, "send").click()
        self.wait(lambda d: self.text("status") not in ("", status) or (
            len(self.bot_messages()) > bots and self.text("stats") not in ("", stats)))
        return self.bot_messages(), self.text("stats"), self.text("status")

    def bot_messages(self):
        return [e.text.strip() for e in
                self.driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")]

    def view(self):
        return [e.text for e in
                self.driver.find_elements(By.CSS_SELECTOR, "#visualisation .token .text")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("web-checkpoint"))


@pytest.fixture(scope="module")
def server(checkpoint):
    server = Server("--model", str(checkpoint), "--delay", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def driver():
    driver = browser()
    yield driver
    driver.quit()


def expected_answers(checkpoint, messages):
    conversation = Conversation(load_chat_model(str(checkpoint), device="cpu"))
    replies = []
    for message in messages:
        *_, reply = conversation.reply(message, Settings())
        replies.append(reply)
    return replies


def view_of(checkpoint, ids):
    chat = load_chat_model(str(checkpoint), device="cpu")
    stop = next((i for i, t in enumerate(ids) if t in chat.stop_ids), len(ids) - 1)
    return ["\u220e" if t in chat.stop_ids else chat.tokenizer.decode([t]).strip()
            for t in ids[:stop + 1]]


def test_chat_in_the_browser(server, driver, checkpoint):
    first, second = expected_answers(checkpoint, ["Sort: 3 1 2", "Reverse: abc"])
    page = Page(driver, server.url)
    bots, stats, status = page.ask("Sort: 3 1 2")
    assert status == ""
    assert bots == [first.text]
    assert stats.startswith("32 forwards, 32 tokens in ") and stats.endswith("tokens/s)")
    # the denoising view: the last step's token at each answer position, up to the answer's
    # first stop id (included)
    assert [piece.strip() for piece in page.view()] == view_of(checkpoint, first.ids)
    bots, stats, status = page.ask("Reverse: abc")  # the history is carried
    assert bots == [first.text, second.text] and status == ""


def test_bad_input_is_reported_and_the_app_keeps_running(server, driver, checkpoint, tmp_path):
    (answer,) = expected_answers(checkpoint, ["Sort: 3 1 2"])
    page = Page(driver, server.url)
    _, _, status = page.ask("   ")
    assert "empty message" in status
    _, _, status = page.ask("x" * 400)
    assert "message too long" in status and "context of 256 tokens" in status
    # a model directory that is not a checkpoint
    driver.find_element(By.CSS_SELECTOR, ".label-wrap").click()  # open the settings
    model = page.wait(lambda d: d.find_element(By.CSS_SELECTOR, "#model textarea"))
    model.clear()
    model.send_keys(str(tmp_path))
    driver.find_element(By.ID, "load").click()
    page.wait(lambda d: "no config.json" in page.text("status"))
    model.clear()
    model.send_keys(str(checkpoint))
    driver.find_element(By.ID, "load").click()
    page.wait(lambda d: "Loaded" in page.text("status"))
    bots, stats, status = page.ask("Sort: 3 1 2")
    assert bots == [answer.text] and status == "" and "forwards" in stats
    assert server.process.poll() is None


def test_constraints_on_the_page(server, driver, checkpoint):
    """The constraints field reaches generate: the word stands in the answer; a bad entry and
    a position past the answer are reported on the page, and the server goes on."""
    page = Page(driver, server.url)
    constraints = driver.find_element(By.CSS_SELECTOR, "#constraints textarea")
    constraints.send_keys("0:zq")
    bots, _, status = page.ask("Sort: 3 1 2")
    assert status == "" and bots[-1].startswith("zq")
    for bad, reason in (("nonsense", "write position:word"), ("99:a", "constraints")):
        constraints.clear()
        constraints.send_keys(bad)
        _, _, status = page.ask("Sort: 3 1 2")
        assert reason in status
    assert server.process.poll() is None


def test_tiny_chat_answers_in_the_browser():
    question = os.environ.get("GENJO_FAST_WEB_QUESTION", "Sort: 3 1 2")
    answer = os.environ.get("GENJO_FAST_WEB_ANSWER", "1 2 3")
    screenshot = os.environ.get("GENJO_FAST_WEB_SCREENSHOT")
    server = Server("--delay", "0.3" if screenshot else "0")
    driver = browser()
    try:
        page = Page(driver, server.url)
        if screenshot:
            box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
            box.send_keys(question)
            driver.find_element(By.ID, "send").click()
            # mid-denoising: some positions still masked, some decoded
            page.wait(lambda d: "\u2591" in page.view()
                      and any(piece != "\u2591" for piece in page.view()))
            driver.save_screenshot(screenshot)
            page.wait(lambda d: "forwards" in page.text("stats"))
            bots = page.bot_messages()
        else:
            bots, _, status = page.ask(question)
            assert status == ""
        assert bots == [answer]
    finally:
        driver.quit()
        server.stop()
