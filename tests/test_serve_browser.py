"""The web page of ``edgevlm serve`` in a real headless Chromium (selenium + Debian's chromium / chromium-driver).

One real server (``create_app(ServeSettings(...))`` under uvicorn, on a free loopback port, in a background thread)
serves a tiny random-init bundle with an API key. The tests open ``/``, upload a PNG through the file input (the page
turns it into a data URL), type the key and a question, submit, and wait for ``document.body.dataset.state`` to
become ``done``: the streamed answer must be non-empty and the latency bar ``#timings-bar`` must have its segments
(image encode among them, from the final chunk's ``timings``). A screenshot is saved under the test's tmp dir
(``EDGEVLM_SCREENSHOT_DIR``, when set, gets a copy), and the page's console must hold no error. A second test sends a
wrong key and checks that the OpenAI error shape reaches ``#error``.

Skips, with the reason, where selenium, chromium or chromedriver is missing (``.ci/run`` installs the Debian
packages; selenium comes with the ``dev`` extra) or the ``serve`` extra is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures_bundles import QUESTION, tiny_bundle, write_png

pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -e '.[dev]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

API_KEY = "s3-browser-test-key"
WAIT_S = 90.0


def _find(*names: str, paths: tuple[str, ...] = ()) -> str | None:
    for p in paths:
        if os.access(p, os.X_OK):
            return p
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome", paths=("/usr/bin/chromium",))
CHROMEDRIVER = _find("chromedriver", paths=("/usr/bin/chromedriver",))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does this)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A real uvicorn server with the edgevlm app on a free loopback port; stopped after the module's tests."""
    import uvicorn

    import edgevlm

    if not (Path(edgevlm.__file__).parent / "serve" / "__init__.py").is_file():
        pytest.skip("edgevlm.serve (the server package) is not in this tree yet")
    from edgevlm.serve import ServeSettings, create_app

    bundle, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    app = create_app(ServeSettings(bundle=bundle, api_key=API_KEY, threads=1, warmup=False))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-browser-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn exited before it started (see the captured log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail("uvicorn did not start within 120 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _ask(driver, url: str, image: Path, key: str, question: str = QUESTION) -> str:
    """Open the page, fill it in, submit; return the final ``data-state`` (``done`` or ``error``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.get_log("browser")                                   # drop whatever an earlier page logged
    assert driver.execute_script("return document.body.dataset.state") == "idle"
    driver.find_element(By.ID, "image").send_keys(str(image))
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()     # the key field lives in <details>
    driver.find_element(By.ID, "max-tokens").clear()
    driver.find_element(By.ID, "max-tokens").send_keys("12")
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    return driver.execute_script("return document.body.dataset.state")


def test_page_streams_answer_and_timings_bar(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = write_png(tmp_path / "question.png", seed=3)
    t0 = time.perf_counter()
    state = _ask(browser, server_url, image, API_KEY)
    elapsed = time.perf_counter() - t0
    shot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    if os.environ.get("EDGEVLM_SCREENSHOT_DIR"):
        out = Path(os.environ["EDGEVLM_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)

    error = browser.find_element(By.ID, "error").text
    assert state == "done", f"page ended in state {state!r}: {error!r}"
    assert not error
    answer = browser.find_element(By.ID, "answer")
    assert answer.text.strip(), "the streamed answer is empty"
    assert int(answer.get_attribute("data-chunks") or 0) >= 1, "no content delta came through the stream"

    segments = browser.find_elements(By.CSS_SELECTOR, "#timings-bar .segment")
    stages = [s.get_attribute("data-stage") for s in segments]
    assert {"image", "prefill", "decode"} <= set(stages), stages
    ms = {s.get_attribute("data-stage"): float(s.get_attribute("data-ms")) for s in segments}
    assert ms["image"] > 0 and ms["prefill"] > 0, ms
    widths = [s.size["width"] for s in segments]
    bar_width = browser.find_element(By.ID, "timings-bar").size["width"]
    assert sum(widths) <= bar_width + len(widths) * 3, (widths, bar_width)   # segments share one bar
    legend = browser.find_element(By.ID, "timings-legend").text
    assert "image encode" in legend and "tok/s" in legend, legend
    usage = browser.find_element(By.ID, "usage").text
    assert "prompt" in usage and "completion" in usage, usage
    assert "finish: " in usage, usage

    logs = browser.get_log("browser")
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, f"console errors: {severe}"
    assert elapsed < WAIT_S


def test_page_shows_openai_error_for_wrong_key(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = write_png(tmp_path / "question.png", seed=4)
    state = _ask(browser, server_url, image, "not-the-key")
    assert state == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "401" in error.text, error.text
    assert browser.find_element(By.ID, "answer").text == ""
    assert not browser.find_elements(By.CSS_SELECTOR, "#timings-bar .segment")
