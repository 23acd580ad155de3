"""The opt-out and review pages in a real browser (headless Debian Chromium driven by Selenium) against the running
stack: an artist files through the form and follows the status page to a final state; an operator signs in, holds
and promotes from the review page. Each page's screenshot is saved under ESD_SCREENSHOTS (`make screenshots`: the
README's docs/screenshots), else in the system's temporary directory, so a test run leaves the checkout as it was."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest


SHOTS = Path(os.environ.get("ESD_SCREENSHOTS") or Path(tempfile.gettempdir()) / "esd-screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_window_size(1000, 1400)
    yield driver
    driver.quit()


def shot(browser, name: str, width: int = 1000) -> Path:
    """A screenshot of the whole page laid out WIDTH pixels wide (Chrome's own full-page capture)."""
    import base64

    browser.set_window_size(width, 900)
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    png = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(png["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    browser.set_window_size(1000, 1400)
    return path


def by_id(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def test_an_artist_opts_out_and_an_operator_decides_in_the_browser(browser, full_stack, platform):
    from selenium.webdriver.common.by import By

    from infra import users

    base = f"http://{full_stack.host}:{full_stack.api_port}"
    browser.get(f"{base}/opt-out")
    assert "Ask us to stop imitating your work" in browser.page_source
    # every input has a label the browser ties to it
    for field in ("name", "contact", "concept", "evidence_urls", "evidence_text", "consent"):
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{field}']"), field
    shot(browser, "opt-out", 390)        # a phone's width

    # an empty form: each problem beside its field, nothing filed
    before = len(platform.requests.list(max_results=None))
    by_id(browser, "concept").submit()
    for field in ("name", "contact", "concept", "consent"):
        assert by_id(browser, f"{field}-error").is_displayed()
        assert by_id(browser, field).get_attribute("aria-invalid") == "true"
    shot(browser, "opt-out-errors")
    assert len(platform.requests.list(max_results=None)) == before

    # filled in by keyboard, as a person would
    for field, text in (("name", "Studio Moreau"), ("contact", "agent@studio-moreau.example"),
                        ("concept", "Vela Moreau"), ("evidence_urls", "https://example.org/gallery"),
                        ("evidence_text", "Our catalogue since 2019.")):
        by_id(browser, field).send_keys(text)
    by_id(browser, "consent").click()
    by_id(browser, "concept").submit()
    # filing writes to the registry before the redirect: on a loaded machine that outlasts the submit call
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, 60).until(lambda b: "/opt-out/requests/" in b.current_url)
    except TimeoutException:
        pass
    assert "/opt-out/requests/" in browser.current_url and "token=" in browser.current_url, (
        browser.current_url, browser.find_element(By.TAG_NAME, "body").text[:1500])
    request_id = browser.current_url.split("/opt-out/requests/")[1].split("?")[0]
    assert "Where it stands" in browser.page_source and "studio-moreau.example" not in browser.page_source

    # the status page follows the request to its end in plain words
    deadline, text = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        browser.refresh()
        text = browser.find_element(By.CSS_SELECTOR, "[role=status]").text
        if text.startswith(("Done.", "A person is reviewing", "Something went wrong")):
            break
        time.sleep(1)
    assert text.startswith(("Done.", "A person is reviewing")), text
    assert not browser.find_elements(By.CSS_SELECTOR, "meta[http-equiv=refresh]")   # final: it stops refreshing
    assert len(browser.find_elements(By.CSS_SELECTOR, "main table tbody tr")) >= 3    # each step, with its time
    shot(browser, "opt-out-status")

    # an operator signs in (a wrong credential is named beside the field), holds and then promotes, with reasons
    user, token = users.add(full_stack, f"olga-{uuid.uuid4().hex[:4]}", "operator")
    browser.get(f"{base}/review")
    assert browser.current_url.endswith("/review/sign-in")
    by_id(browser, "credential").send_keys("esd_not-a-credential")
    by_id(browser, "credential").submit()
    assert "not valid" in by_id(browser, "credential-error").text
    by_id(browser, "credential").send_keys(token)
    by_id(browser, "credential").submit()
    assert browser.current_url.endswith("/review") and user.name in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, f"a[href='/review/requests/{request_id}']")
    shot(browser, "review-queue")

    browser.get(f"{base}/review/requests/{request_id}")
    grids = browser.find_elements(By.CSS_SELECTOR, "img.grid")
    assert grids and all(browser.execute_script("return arguments[0].naturalWidth", g) > 0 for g in grids)
    assert "UA (erased)" in browser.page_source and "IRA" in browser.page_source and "Lineage" in browser.page_source
    if platform.requests.require(request_id).status == "promoted":
        by_id(browser, "hold-reason").submit()                           # no reason: refused beside the field
        assert "Give a reason" in by_id(browser, "hold-reason-error").text
        by_id(browser, "hold-reason").send_keys("checking the grid by eye")
        by_id(browser, "hold-reason").submit()
        assert "Held for review." in browser.page_source
        assert platform.requests.require(request_id).status == "held"
    by_id(browser, "promote-reason").send_keys("grid reviewed: the stripes are gone")
    by_id(browser, "promote-reason").submit()
    assert "Promoted: production is" in browser.page_source, browser.page_source[:2000]
    record = platform.requests.require(request_id)
    assert record.status == "promoted" and record.reason == f"{user.name}: grid reviewed: the stripes are gone"
    assert platform.requests.history(request_id)[-1]["reason"] == record.reason
    shot(browser, "review-request")
