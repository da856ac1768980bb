"""The playground and the API docs in a real browser: Debian's Chromium, driven by Selenium
through chromedriver, against a real runner behind nginx. Each state the page reaches is
kept as a screenshot under build/screenshots/ (CI keeps build/)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from stockade.runner.local import NginxProcess, RunnerProcess, runner_config
from support.runners import own_runner

SHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEYED_PORT = 18099
# Chromium's own calls home stay off (this machine's network is closed), as do the
# sandbox (root) and the GPU (no display).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1100")
# A 2x2 PNG (red, green / blue, white), made in the run with zlib: no library needed.
PNG_PROGRAM = r"""
import os, struct, zlib
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
rows = b"\0\xff\0\0\0\xff\0" + b"\0\0\0\xff\xff\xff\xff"
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
os.makedirs("out", exist_ok=True)
open("out/plot.png", "wb").write(png)
open("out/table.html", "w").write(
    "<table><tr><th>answer</th></tr><tr><td id='cell'>42</td></tr></table>"
    "<script>document.getElementById('cell').textContent = 'scripted'</script>")
print("drawn")
"""


@pytest.fixture(scope="module")
def downloads() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stockade-downloads-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make test-packages` installs Debian's "
                    "chromium and chromium-driver")
    SHOTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="stockade-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager never runs: paths are given
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def wait(driver: WebDriver, what: str, condition: object, timeout: float = 30) -> object:
    try:
        return WebDriverWait(driver, timeout).until(condition)  # type: ignore[arg-type]
    except TimeoutException:
        shot(driver, f"timeout-{what.replace(' ', '-')}")
        raise AssertionError(f"the page never showed {what}") from None


def open_page(driver: WebDriver, base: str, path: str = "/") -> None:
    driver.get(f"{base}{path}")
    if path == "/":
        wait(driver, "the limits", lambda d: d.find_elements(By.CSS_SELECTOR, "[data-limit]"))


def type_program(driver: WebDriver, code: str) -> None:
    editor = driver.find_element(By.ID, "code")
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys(Keys.DELETE)
    editor.send_keys(code)


def run_and_wait(driver: WebDriver, status: str | None = None) -> WebElement:
    """Ctrl+Enter, then the badge (of `status`, if given) or the API's error."""
    driver.find_element(By.ID, "code").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(driver, "the run's end", lambda d: not d.find_element(By.ID, "run").get_attribute(
        "disabled"))
    badge = driver.find_element(By.ID, "status")
    if status is not None:
        wait(driver, f"status {status}", lambda d: badge.text == status)
    return badge


def set_limit(driver: WebDriver, name: str, value: str) -> None:
    driver.find_element(By.TAG_NAME, "summary").click()
    field = driver.find_element(By.ID, f"limit-{name}")
    field.clear()
    field.send_keys(value)


@pytest.fixture
def page(browser: WebDriver, nginx: NginxProcess) -> str:
    base = f"http://127.0.0.1:{nginx.port}"
    open_page(browser, base)
    return base


def test_a_program_typed_and_run_shows_its_output(browser: WebDriver, page: str) -> None:
    type_program(browser, "import sys\nprint('hello, browser', sys.argv[1:])")
    highlighted = browser.find_element(By.ID, "highlight")
    assert [s.text for s in highlighted.find_elements(By.CLASS_NAME, "tok-kw")] == ["import"]
    assert "print" in [s.text for s in highlighted.find_elements(By.CLASS_NAME, "tok-bi")]
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "args").send_keys("-v")
    badge = run_and_wait(browser, "ok")
    assert "ok" in badge.get_attribute("class").split()
    assert browser.find_element(By.ID, "stdout").text == "hello, browser ['-v']"
    assert "exit 0" in browser.find_element(By.ID, "facts").text
    shot(browser, "ok")


def test_a_run_goes_to_the_environment_chosen(browser: WebDriver, page: str) -> None:
    picker = Select(browser.find_element(By.ID, "environment"))
    wait(browser, "the environments", lambda d: len(picker.options) == 3)
    assert picker.first_selected_option.get_attribute("value") == "python-3.11"
    assert [o.get_attribute("value") for o in picker.options] == [
        "python-3.11", "python-3.13", "python-3.13-base"]
    assert "standard library" in picker.options[2].text
    picker.select_by_value("python-3.13")
    type_program(browser, "import sys, sklearn\nprint(sys.version_info[:2])")
    run_and_wait(browser, "ok")
    assert browser.find_element(By.ID, "stdout").text == "(3, 13)"
    # A session runs in the default environment: keeping state picks it, and holds it.
    browser.find_element(By.ID, "keep").click()
    assert picker.first_selected_option.get_attribute("value") == "python-3.11"
    assert not browser.find_element(By.ID, "environment").is_enabled()
    browser.find_element(By.ID, "keep").click()
    assert browser.find_element(By.ID, "environment").is_enabled()


def test_output_shows_while_the_program_still_runs(browser: WebDriver, page: str) -> None:
    type_program(browser, "import time\nprint('first', flush=True)\ntime.sleep(2)\n"
                 "print('second')")
    browser.find_element(By.ID, "code").send_keys(Keys.CONTROL, Keys.ENTER)
    stdout, badge = browser.find_element(By.ID, "stdout"), browser.find_element(By.ID, "status")
    wait(browser, "the first line", lambda d: stdout.text == "first", timeout=10)
    assert badge.text == "running"
    assert browser.find_element(By.ID, "run").get_attribute("disabled")
    shot(browser, "streaming")
    run_and_wait(browser, "ok")
    assert stdout.text == "first\nsecond"


def test_with_keep_state_runs_are_cells_of_one_session(browser: WebDriver, page: str,
                                                      nginx: NginxProcess) -> None:
    browser.find_element(By.ID, "keep").click()
    type_program(browser, "import pandas as pd\nx = 41")
    run_and_wait(browser, "ok")
    assert "1 cells run" in browser.find_element(By.ID, "session-info").text
    type_program(browser, "x + 1")
    run_and_wait(browser, "ok")
    assert browser.find_element(By.CSS_SELECTOR, "#shown pre").text == "42"
    type_program(browser, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\n"
                 "pd.DataFrame({'a': [1, 2]})")
    run_and_wait(browser, "ok")
    image = wait(browser, "the figure", lambda d: d.find_element(By.CSS_SELECTOR, "#shown img"))
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 100
    frame = browser.find_element(By.CSS_SELECTOR, "#shown iframe")
    assert frame.get_attribute("sandbox") == "" and "<table" in frame.get_attribute("srcdoc")
    shot(browser, "session")
    assert len(nginx.get("/v1/sessions").json()["sessions"]) == 1
    browser.find_element(By.ID, "end-session").click()
    wait(browser, "the session's end", lambda d: not nginx.get("/v1/sessions").json()[
        "sessions"])
    assert browser.find_element(By.ID, "session-info").text == "session ended"


def test_keyboard_tab_indents_and_escape_tab_leaves(browser: WebDriver, page: str) -> None:
    type_program(browser, "if True:\n")
    editor = browser.find_element(By.ID, "code")
    editor.send_keys(Keys.TAB, "pass")
    assert editor.get_attribute("value") == "if True:\n    pass"
    editor.send_keys(Keys.ESCAPE, Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") != "code"


def test_a_limit_hit_shows_its_status(browser: WebDriver, page: str) -> None:
    type_program(browser, "while True: pass")
    set_limit(browser, "cpu_time_s", "0.5")
    badge = run_and_wait(browser, "time_limit")
    assert "ok" not in badge.get_attribute("class").split()
    assert "CPU time limit" in browser.find_element(By.ID, "message").text
    shot(browser, "time-limit")


def test_an_api_error_is_shown_as_the_api_words_it(browser: WebDriver, page: str,
                                                   nginx: NginxProcess) -> None:
    type_program(browser, "print(1)")
    set_limit(browser, "memory_mib", "999999")
    run_and_wait(browser)
    error = browser.find_element(By.ID, "api-error")
    wait(browser, "the API's error", lambda d: error.is_displayed())
    answer = nginx.post("/v1/runs", {"code": "print(1)", "limits": {"memory_mib": 999999}})
    detail = answer.json()["error"]
    assert error.text.startswith(f"{detail['code']}: {detail['message']} (field limits.")
    shot(browser, "api-error")


def test_program_output_is_text_never_html(browser: WebDriver, page: str) -> None:
    type_program(browser, "print('<b>bold</b><img src=x onerror=alert(1)>')")
    run_and_wait(browser, "ok")
    stdout = browser.find_element(By.ID, "stdout")
    assert stdout.text == "<b>bold</b><img src=x onerror=alert(1)>"
    assert stdout.find_elements(By.XPATH, "./*") == []


def test_a_file_goes_in_and_one_comes_back_as_a_download(browser: WebDriver, page: str,
                                                         downloads: Path,
                                                         tmp_path: Path) -> None:
    source = tmp_path / "numbers.txt"
    source.write_text("1\n2\n3\n")
    type_program(browser, "import os\nos.makedirs('out')\ntotal = sum(map(int, open("
                 "'numbers.txt')))\nopen('out/total.txt', 'w').write(str(total))")
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "files").send_keys(str(source))
    wait(browser, "the chosen file", lambda d: "numbers.txt" in d.find_element(
        By.ID, "file-list").text)
    run_and_wait(browser, "ok")
    link = browser.find_element(By.LINK_TEXT, "total.txt")  # named relative to out/
    link.click()
    saved = downloads / "total.txt"
    wait(browser, "the download", lambda d: saved.is_file() and saved.read_text() == "6")
    shot(browser, "files")


def test_a_figure_and_a_table_are_shown_the_table_without_its_script(
        browser: WebDriver, page: str) -> None:
    type_program(browser, PNG_PROGRAM.strip())
    run_and_wait(browser, "ok")
    image = browser.find_element(By.CSS_SELECTOR, "#renders img")
    wait(browser, "the figure", lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", image) == 2)
    frame = browser.find_element(By.CSS_SELECTOR, "#renders iframe")
    assert frame.get_attribute("sandbox") == ""
    browser.switch_to.frame(frame)
    try:
        assert browser.find_element(By.ID, "cell").text == "42"  # its script never ran
    finally:
        browser.switch_to.default_content()
    shot(browser, "figure-and-table")


def test_the_api_docs_render_the_runners_own_document(browser: WebDriver,
                                                      nginx: NginxProcess) -> None:
    browser.get_log("browser")  # what earlier pages said is not this page's
    open_page(browser, f"http://127.0.0.1:{nginx.port}", "/docs")
    wait(browser, "the operations", lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/runs", "/v1/languages", "/api/v2/execute"} <= paths
    refused = [e["message"] for e in browser.get_log("browser")
               if "Content Security Policy" in e["message"]]
    assert refused == []
    shot(browser, "docs")


def test_at_phone_width_nothing_scrolls_sideways(browser: WebDriver, page: str) -> None:
    browser.set_window_size(390, 844)
    try:
        open_page(browser, page)
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= browser.execute_script("return window.innerWidth")
        shot(browser, "phone")
    finally:
        browser.set_window_size(1280, 1100)


@pytest.fixture(scope="module")
def keyed() -> Iterator[RunnerProcess]:
    config = runner_config(KEYED_PORT, "stockade-p-", pool_size=1, lean_pool_size=1,
                           anonymous=None)
    with own_runner(config) as process:
        yield process


def test_a_runner_that_needs_a_key_asks_for_one_and_keeps_it_for_the_tab(
        browser: WebDriver, keyed: RunnerProcess) -> None:
    base = f"http://127.0.0.1:{keyed.port}"
    open_page(browser, base)
    browser.execute_script("sessionStorage.clear(); localStorage.clear()")
    open_page(browser, base)
    assert browser.find_element(By.ID, "key-box").is_displayed()
    type_program(browser, "print('keyed')")
    run_and_wait(browser)
    assert browser.find_element(By.ID, "api-error").text.startswith("key_required: ")
    key = keyed.add_key("browser")
    browser.find_element(By.ID, "key").send_keys(key)
    run_and_wait(browser, "ok")
    assert browser.find_element(By.ID, "stdout").text == "keyed"
    stored = browser.execute_script("return [JSON.stringify(sessionStorage), localStorage.length]")
    assert stored == [json.dumps({"stockade.api-key": key}, separators=(",", ":")), 0]
    shot(browser, "key")
    browser.execute_script("sessionStorage.clear()")  # the next test's tab starts keyless
