"""report.html as a reader sees it: opened in headless Chromium (the system browser and its driver, through
Selenium) in a 1400 × 900 viewport, every image loads, nothing is wider than the window, and the answer for
every task (its rows of the decision summary) is on the first screen."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tbptt_bench.report.report import build_report
from test_report import FAST, quick_tables

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="no system Chromium and chromedriver (apt-get install chromium chromium-driver)")
WIDTH, HEIGHT = 1400, 900


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report"
    build_report(quick_tables(tasks=("copy", "adding"), models=("lstm", "gru")), out, FAST)
    return out / "report.html"


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(BROWSER)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_a_browser(page: Path, browser) -> None:  # type: ignore[no-untyped-def]
    browser.get(page.as_uri())
    inner = browser.execute_script("return window.innerWidth")
    assert inner >= 1300
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) >= 10
    assert all(done and width > 0 for _, done, width in images), [alt for alt, done, w in images if not w]
    assert browser.execute_script("return document.documentElement.scrollWidth") <= inner
    too_wide = browser.execute_script(
        "return Array.from(document.querySelectorAll('body *'))"
        ".filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)"
        ".map(e => e.tagName + '#' + e.id)")
    assert too_wide == []
    top = browser.execute_script(
        "const t = document.getElementById('table-decision'); return t ? t.getBoundingClientRect().top : null")
    assert top is not None and 0 <= top < browser.execute_script("return window.innerHeight")


def test_every_tasks_answer_is_on_the_first_screen(page: Path, browser) -> None:  # type: ignore[no-untyped-def]
    """Each task's rows of the decision summary lie wholly inside the first 1400 × 900 screen, with no
    horizontal scrolling, and each names a K, its cost at the training size and at scale, and its metric."""
    browser.get(page.as_uri())
    assert browser.execute_script("return [window.innerWidth, window.innerHeight]") == [WIDTH, HEIGHT]
    assert browser.execute_script("return document.documentElement.scrollWidth") <= WIDTH
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#table-decision tbody tr')).map(r => {"
        "const b = r.getBoundingClientRect(); return [r.cells[0].innerText, r.innerText, b.top, b.bottom, b.right]})")
    tasks = {"copy", "adding"}
    assert {text.split(" · ")[0] for text, *_ in rows} == tasks
    for first, text, top, bottom, right in rows:
        assert 0 <= top and bottom <= HEIGHT and right <= WIDTH, (first, top, bottom, right)
    answered = [text for first, text, *_ in rows if "lstm" in first]
    assert len(answered) == 2
    for text in answered:
        assert "K " in text and "train size" in text and "at scale" in text and "vs full" in text, text
        assert "not measured" not in text, text  # the synthetic tables time every task × model and a scale block
