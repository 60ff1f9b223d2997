"""The review app in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): every thumbnail
decodes, a query shows its images, a group marked drop and a sample marked keep are there after a reload, the
export is the decisions file, and `clean(..., decisions=FILE)` keeps exactly the expected samples."""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request

import pytest

from review_run import FLAGGED, GROUPS, KEYS, RULE, review_run  # noqa: F401 - review_run is a fixture
from dede_core.review import DecisionStore, server
from dede_core.stages.clean import clean
from test_verdicts import cleaned_keys

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Chromium and chromedriver (Debian packages chromium, chromium-driver)")


@pytest.fixture
def app_url(review_run):
    srv, url = server(review_run)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)  # never a download
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {condition}")


DECODED = ("const imgs = [...document.querySelectorAll(arguments[0] + ' img')];"
           "return imgs.length && imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;")


def widths(driver, selector: str, count: int = 1) -> list[int]:
    """The decoded widths of the images under `selector`, once at least `count` of them have loaded (groups load
    one request each: on a busy machine the second may still be on its way)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = driver.execute_script(DECODED, selector)
        if found and len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no loaded images under {selector}")


def refreshes(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.refreshes || '0'"))


def test_review_in_a_browser(review_run, app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(app_url)
    wait(d, "return document.body.dataset.refreshes")
    assert "6 flagged samples" in d.find_element(By.ID, "summary").text
    wait(d, "return document.getElementById('map-note').textContent.startsWith('PCA')")
    for group in d.find_elements(By.CSS_SELECTOR, ".group button.show"):
        group.click()
    assert len(widths(d, ".group[data-id='n1'] .group-grid", count=4)) == 4
    shown = widths(d, "#groups", count=6)
    assert min(shown) > 0 and len(shown) == 6  # every thumbnail decoded
    d.save_screenshot(os.path.join(DOCS, "review-groups.png"))

    d.find_element(By.ID, "sql").clear()
    d.find_element(By.ID, "sql").send_keys("SELECT key, score FROM scores WHERE label = 1 ORDER BY score DESC")
    d.find_element(By.ID, "run-query").click()
    assert len(widths(d, "#query-grid")) == 8 and min(widths(d, "#query-grid")) > 0

    before = refreshes(d)
    d.find_element(By.CSS_SELECTOR, ".group[data-id='n1'] .group-note").send_keys("same sticker")
    d.find_element(By.CSS_SELECTOR, ".group[data-id='n1'] .drop-group").click()
    wait(d, f"return Number(document.body.dataset.refreshes) > {before}")
    before = refreshes(d)
    row = d.find_element(By.CSS_SELECTOR, "#flagged tr[data-key='k23']")
    row.find_element(By.CSS_SELECTOR, "input.note").send_keys("a clean near-duplicate")
    row.find_element(By.CSS_SELECTOR, "button.keep").click()
    wait(d, f"return Number(document.body.dataset.refreshes) > {before}")

    d.refresh()
    wait(d, "return document.body.dataset.refreshes")
    found = d.execute_script("return Object.fromEntries([...document.querySelectorAll('#decisions tr[data-key]')]"
                             ".map(r => [r.dataset.key, r.dataset.decision]))")
    assert found == dict.fromkeys(GROUPS["n1"], "drop") | {"k23": "keep"}
    assert "keep" in d.find_element(By.CSS_SELECTOR, "#flagged tr[data-key='k23']").text
    d.find_element(By.CSS_SELECTOR, "#flagged th[data-col='key']").click()  # sortable by each column
    wait(d, "return document.querySelector('#flagged tr[data-key]').dataset.key === 'k23'")
    d.execute_script("document.getElementById('decisions').scrollIntoView()")
    d.save_screenshot(os.path.join(DOCS, "review-decisions.png"))

    href = d.find_element(By.ID, "export").get_attribute("href")
    exported = tmp_path / "decisions.parquet"
    exported.write_bytes(urllib.request.urlopen(href, timeout=30).read())
    assert exported.read_bytes() == open(DecisionStore(review_run).path, "rb").read()

    shards, scores = os.path.join(review_run, "shards"), os.path.join(review_run, "scores")
    with pytest.raises(ValueError, match="decisions"):  # the run's clean folder was made without them
        clean(shards, scores, os.path.join(review_run, "clean"), RULE, decisions=exported, progress=False)
    result = clean(shards, scores, tmp_path / "reviewed", RULE, decisions=exported, progress=False)
    expected = set(KEYS) - (FLAGGED | set(GROUPS["n1"])) | {"k23"}
    assert cleaned_keys(str(tmp_path / "reviewed")) == expected
    assert result.counts.kept == len(expected)
