"""A real browser: Debian's chromium, headless, driven by selenium through chromedriver, on
the dashboard served by ``streamlit run`` (the command ``safegate dashboard`` runs) over a
seeded home. It signs in with a reviewer key, opens every page, labels a flagged item and
checks the label landed in the audit store with the reviewer's key id; then signs in again
as an admin and chats in the playground through a real gateway (``served_gateway``: the
real engine, upstreams answered by litellm's ``mock_response``), seeing the streamed answer
and the filter's annotations. It saves a screenshot of each page to a scratch folder, or
to ``$SAFEGATE_SCREENSHOTS`` (``SAFEGATE_SCREENSHOTS=docs/screenshots`` refreshes the
README's).

It needs ``/usr/bin/chromium`` and ``chromedriver`` (Debian packages ``chromium`` and
``chromium-driver``; ``make browser``, part of ``make test``, installs them as root) and
the ``selenium`` package (the ``dev`` extra). Without them it FAILS and says what is
missing; ``SAFEGATE_SKIP_BROWSER_TEST=1`` skips it knowingly, with that reason shown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from dashboard.cli import streamlit_command
from dashboard.playground import GATEWAY_URL_VARIABLE
from gateway.audit import ReviewState
from tests.dashboard.conftest import open_stores
from tests.dashboard.seed import Seeded
from tests.dashboard.served_gateway import (
    ANSWER,
    HATE,
    QUESTION,
    ServedGateway,
)
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
# Where each page's screenshot goes: a scratch folder, so a test run leaves the checkout as
# it was; SAFEGATE_SCREENSHOTS=docs/screenshots refreshes the README's.
SCREENSHOTS = Path(
    os.environ.get("SAFEGATE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "safegate-screenshots"
)
CHROMIUM = os.environ.get("SAFEGATE_CHROMIUM", "/usr/bin/chromium")
SKIP = "SAFEGATE_SKIP_BROWSER_TEST"
START_TIMEOUT_S = 120.0
WAIT_S = 60.0
WIDTH = 1440
T = TypeVar("T")
RUNNING = '[data-testid="stStatusWidget"] [data-testid="stStatusWidgetRunningIcon"]'


def _chromedriver() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    if os.environ.get(SKIP):
        pytest.skip(f"{SKIP} is set: the dashboard's browser test was skipped on purpose")
    missing = [
        name
        for name, present in (
            (f"chromium ({CHROMIUM})", Path(CHROMIUM).exists()),
            ("chromedriver", _chromedriver() is not None),
        )
        if not present
    ]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        pytest.fail(
            f"the dashboard's browser test cannot run: missing {', '.join(missing)}. As root, "
            "`make browser` installs Debian's chromium and chromium-driver; set "
            f"{SKIP}=1 to skip this test knowingly.",
            pytrace=False,
        )
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(_chromedriver()), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(
    fresh: Seeded,
    tmp_path: Path,
    served_gateway: ServedGateway,
) -> Iterator[str]:
    """The dashboard, as ``safegate dashboard`` starts it, over the seeded home, with the
    gateway of that home for its playground."""
    port = free_port()
    env = {
        **os.environ,
        "SAFEGATE_HOME": str(fresh.home),
        GATEWAY_URL_VARIABLE: served_gateway.url,
    }
    env.pop("SAFEGATE_DATABASE_URL", None)
    log = (tmp_path / "streamlit.log").open("w")
    process = subprocess.Popen(  # noqa: S603 - our own command line
        streamlit_command(host="127.0.0.1", port=port),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"streamlit exited: {(tmp_path / 'streamlit.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("streamlit did not answer its health check in time")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait(driver: Any, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # Streamlit re-renders elements while a script runs: a stale one is looked up again.
    waiting = WebDriverWait(
        driver, WAIT_S, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return waiting.until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def _settled(driver: Any, title: str) -> None:
    """Wait for the page's title, for the script run to finish and charts to draw."""
    from selenium.webdriver.common.by import By

    _wait(
        driver,
        lambda d: any(title in h.text for h in d.find_elements(By.CSS_SELECTOR, "h1")),
        f"the page titled {title!r}",
    )
    time.sleep(0.5)
    _wait(
        driver,
        lambda d: (
            not d.find_elements(
                By.CSS_SELECTOR,
                '[data-testid="stStatusWidget"] [data-testid="stStatusWidgetRunningIcon"]',
            )
            and "Running" not in d.find_element(By.TAG_NAME, "body").text[:2000]
        ),
        "the script run to finish",
    )
    time.sleep(1.5)  # vega draws its charts after the run


def _screenshot(driver: Any, name: str) -> Path:
    """The whole page: the window is made as tall as Streamlit's scrolling main area (or
    the tallest scrolled element: a page with a chat input scrolls its own container)."""
    height = driver.execute_script(
        "const main = document.querySelector('[data-testid=\"stMain\"]');"
        "const inner = Array.from(document.querySelectorAll('*'));"
        "return Math.max(main ? main.scrollHeight : 0, document.body.scrollHeight,"
        "  ...inner.filter(e => e.scrollHeight > e.clientHeight + 1).map(e => e.scrollHeight));"
    )
    driver.set_window_size(WIDTH, min(int(height) + 120, 6000))
    time.sleep(1.0)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert _with_renderer_retries(lambda: driver.save_screenshot(str(path))), (
        f"no screenshot saved to {path}"
    )
    driver.set_window_size(WIDTH, 1000)
    return path


def _with_renderer_retries(command: Callable[[], T], tries: int = 3) -> T:
    """Run a browser command again when Chromium's renderer missed chromedriver's fixed
    10-second answer deadline, as a tall screenshot can on a loaded machine. The page is
    unchanged by a missed deadline; the last failure is raised."""
    from selenium.common.exceptions import TimeoutException

    for attempt in range(1, tries + 1):
        try:
            return command()
        except TimeoutException:
            if attempt == tries:
                raise
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


def _click(driver: Any, css: str, text: str) -> None:
    """Click the element matching ``css`` whose last line of text is ``text`` (an icon's
    ligature may come first), looking it up again if Streamlit re-rendered it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d: Any) -> bool:
        try:
            for element in d.find_elements(By.CSS_SELECTOR, css):
                if element.text.strip().splitlines()[-1:] == [text]:
                    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
                    element.click()
                    return True
        except StaleElementReferenceException:
            return False
        return False

    _wait(driver, clicked, f"{css} {text!r} to click")


def _click_button(driver: Any, label: str) -> None:
    _click(driver, "button", label)


def _open(driver: Any, title: str) -> None:
    _click(driver, '[data-testid="stSidebarNav"] a', title)
    _settled(driver, title)


def test_a_reviewer_signs_in_labels_an_item_and_every_page_renders(
    browser: Any, served: str, fresh: Seeded
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    # A page's own address, before signing in: still no content.
    _with_renderer_retries(lambda: driver.get(f"{served}/review"))
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type='password']"), "sign-in")
    _wait(driver, lambda d: "Page not found" in d.find_element(By.TAG_NAME, "body").text, "404")
    assert not any(
        item.text in driver.find_element(By.TAG_NAME, "body").text for item in fresh.items
    )

    _with_renderer_retries(lambda: driver.get(served))
    key_input = _wait(
        driver,
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "input[type='password']")), False),
        "the API key field",
    )
    _settled(driver, "safegate dashboard")
    body = driver.find_element(By.TAG_NAME, "body").text
    assert not any(item.text in body for item in fresh.items)  # nothing before signing in
    _screenshot(driver, "sign-in")

    key_input.send_keys(fresh.reviewer_key, Keys.ENTER)
    _settled(driver, "Model comparison")
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "gate FAILED on harm_rate" in body
    assert "Signed in as alice-reviewer (reviewer)" in body
    _screenshot(driver, "compare")

    _open(driver, "Review queue")
    newest = max(fresh.items, key=lambda item: item.created_at)
    assert newest.text in driver.find_element(By.TAG_NAME, "body").text
    _screenshot(driver, "review")
    _click_button(driver, "True positive")

    stores = open_stores(fresh.home)
    try:
        deadline = time.monotonic() + WAIT_S
        while stores.audit.get_item(newest.id).review_state is ReviewState.UNREVIEWED:
            assert time.monotonic() < deadline, "the label never reached the audit store"
            time.sleep(0.25)
        stored = stores.audit.get_item(newest.id)
    finally:
        stores.close()
    assert stored.review_state is ReviewState.TRUE_POSITIVE
    assert stored.reviewer_key_id == fresh.reviewer_id
    _settled(driver, "Review queue")

    _open(driver, "Fine-tuning")
    assert "support-v2" in driver.find_element(By.TAG_NAME, "body").text
    _screenshot(driver, "training")

    _open(driver, "Traffic")
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "32.6%" in body  # the seeded day's block rate
    _screenshot(driver, "traffic")

    # The playground, as an admin (a reviewer key may not chat): a safe turn, streamed, and
    # a blocked one, each with the filter's annotations beside it.
    _click_button(driver, "Sign out")
    key_input = _wait(
        driver,
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "input[type='password']")), False),
        "the API key field again",
    )
    key_input.send_keys(fresh.admin_key, Keys.ENTER)
    _settled(driver, "Model comparison")
    _open(driver, "Playground")
    for message, expected in ((QUESTION, ANSWER), (HATE, "Prompt: blocked: hate")):
        box = _wait(
            driver,
            lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "textarea")), False),
            "the chat input",
        )
        box.send_keys(message, Keys.ENTER)
        _wait(
            driver,
            lambda d, expected=expected: expected in d.find_element(By.TAG_NAME, "body").text,
            repr(expected),
        )
        _settled(driver, "Playground")
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Prompt: safe" in body
    assert "Completion: safe" in body
    assert "not sent to the model: the prompt was blocked" in body
    assert "Send to review" in body
    _screenshot(driver, "playground")
