"""The page at `/` in a real headless Chromium: upload a screenshot, type an instruction, see the route and the click.

Chromium and its driver come from the distribution (`make install` installs them as root
when missing; see the Makefile). Without them the test is skipped on a developer
machine and fails under CI (``CI`` set), so CI never passes without running it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serve/: serve_helpers
import engine_helpers as H  # noqa: E402
from serve_helpers import API_KEY  # noqa: E402

from vlrouter import hookimpl
from vlrouter.core.actions import UIAction

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
CLICK = {"x": 212, "y": 57}


class ClickEverywhere:
    """A test plugin: whatever the tiny random model writes parses as one known click, so the marker shows."""

    @hookimpl
    def parse_action(self, adapter, text):
        return UIAction(name="click", args=dict(CLICK))


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: `make install` installs them (apt, as root)")
        pytest.skip("chromium/chromedriver not installed (make install adds them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vlrouter-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def click_parser(engine):
    plugin = ClickEverywhere()
    engine.plugin_manager.register(plugin)
    try:
        yield
    finally:
        engine.plugin_manager.unregister(plugin)


def test_the_page_routes_an_uploaded_screenshot_and_marks_the_click(server, engine, browser, click_parser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    img, prompt, _ = H.samples()[2]  # a claim-window screen
    shot = tmp_path / "screen.png"
    img.save(shot)
    want = engine.act(img, prompt, max_new_tokens=64)
    wait = WebDriverWait(browser, 30)

    browser.get(f"{server.url}/")
    assert browser.title == "vlrouter"
    browser.find_element(By.ID, "key").send_keys(API_KEY)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2 + len(engine.adapters))
    file_input = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", file_input)  # the drop zone opens it for people
    file_input.send_keys(str(shot))
    wait.until(EC.visibility_of_element_located((By.ID, "shot")))
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    wait.until(EC.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: d.find_element(By.ID, "adapter").text not in ("-", "…", ""))

    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.ID, "adapter").text == want.adapter
    assert browser.find_element(By.ID, "text").text == want.text.strip()
    assert browser.find_element(By.ID, "action").text == f"click(x={CLICK['x']}, y={CLICK['y']})"
    bars = browser.find_elements(By.CSS_SELECTOR, "#probs .bar")
    assert [b.get_attribute("data-adapter") for b in bars] == engine.adapters
    for bar in bars:  # each bar's length is its adapter's probability
        fill, track = bar.find_element(By.CSS_SELECTOR, ".fill"), bar.find_element(By.CSS_SELECTOR, ".track")
        p = want.probs[bar.get_attribute("data-adapter")]
        assert fill.size["width"] / track.size["width"] == pytest.approx(p, abs=0.02)
    marker = browser.find_element(By.ID, "marker")
    assert marker.is_displayed()
    shown = browser.find_element(By.ID, "shot")
    scale = browser.execute_script("return arguments[0].clientWidth", shown) / img.width
    left = browser.execute_script("return parseFloat(arguments[0].style.left)", marker)
    top = browser.execute_script("return parseFloat(arguments[0].style.top)", marker)
    assert left == pytest.approx(CLICK["x"] * scale, abs=1) and top == pytest.approx(CLICK["y"] * scale, abs=1)
    browser.save_screenshot(str(tmp_path / "page.png"))
