"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload a real DICOM, see the findings listed, click one, see its heatmap drawn; save a screenshot.
A failed upload clears the previous result; a very long file name stays inside the page; the page and
the /docs reference run under their Content-Security-Policy without a violation (and inline script is
really blocked)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from chexfound.data.findings import NIH14
from chexfound.serve import Predictor
from chexfound.serve.app import create_app
from chexfound.serve.server import BackgroundServer

from .conftest import ARTIFACTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(120),
    # In CI (.ci/run installs them) a missing browser is a failure, not a skip.
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
                       reason="needs Debian's chromium and chromium-driver (listed in .ci/apt-packages)"),
]

# Fraction of canvas pixels that are clearly coloured (the image itself is grayscale).
COLOURED_JS = """
const c = document.getElementById('view');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  if (Math.abs(d[i] - d[i + 2]) + Math.abs(d[i + 1] - d[i + 2]) > 40) n++;
}
return [n / (d.length / 4), c.width, c.height];
"""


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,900", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, incl. CSP violations
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_drop_a_dicom_and_see_findings_and_heatmap(browser, models: dict[str, Path], dicom_paths: list[Path],
                                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    predictor = Predictor(models["backbone"], models["attention"], device="cpu")
    wait = WebDriverWait(browser, 30)
    with BackgroundServer(create_app(predictor)) as url:
        browser.get(url + "/")
        wait.until(lambda d: "findings" in d.find_element(By.ID, "model-summary").text)
        browser.find_element(By.ID, "file").send_keys(str(dicom_paths[0]))  # RG1_UNCR.dcm

        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#findings li")) == len(NIH14))
        items = browser.find_elements(By.CSS_SELECTOR, "#findings li")
        names = [li.get_attribute("data-name") for li in items]
        probs = [float(li.get_attribute("data-probability")) for li in items]
        assert sorted(names) == sorted(NIH14)
        assert probs == sorted(probs, reverse=True)  # most probable first
        expected = predictor.predict_image(dicom_paths[0])
        assert names[0] == NIH14[int(expected.probabilities.argmax())]
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")

        before, w, h = browser.execute_script(COLOURED_JS)
        assert (w, h) == (512, 512) and before < 0.01  # the plain image first
        items[0].click()
        wait.until(lambda d: d.find_element(By.ID, "view").get_attribute("data-heatmap") == names[0])
        after, _, _ = browser.execute_script(COLOURED_JS)
        assert after > 0.05, f"only {after:.1%} of the canvas is coloured after choosing a heatmap"
        assert names[0] in browser.find_element(By.ID, "caption").text
        assert "glori attention" in browser.find_element(By.ID, "caption").text  # which kind of map
        assert "heatmaps: glori attention" in browser.find_element(By.ID, "model-summary").text

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "page_heatmap.png"
        assert browser.save_screenshot(str(shot))
        shutil.copy(shot, tmp_path / shot.name)

        # An unreadable upload shows the server's 4xx message on the page.
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(b"DICM? no." * 10)
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
        status = browser.find_element(By.ID, "status").text
        assert "400" in status and "bad.dcm" in status
        # ... and nothing of the previous image stays under the error
        assert browser.find_elements(By.CSS_SELECTOR, "#findings li") == []
        for panel in ("right", "viewer", "image-info"):
            assert not browser.find_element(By.ID, panel).is_displayed(), panel
        assert browser.find_element(By.ID, "view").get_attribute("data-heatmap") is None
        assert _csp_violations(browser) == []


def _csp_violations(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


# Elements whose right edge passes their column's, and whether the page scrolls sideways.
OVERFLOW_JS = """
const out = [];
const page = document.documentElement;
if (page.scrollWidth > page.clientWidth + 1) out.push('page ' + page.scrollWidth + ' > ' + page.clientWidth);
for (const col of [document.getElementById('left'), document.getElementById('right')]) {
  const edge = col.getBoundingClientRect().right + 1;
  for (const el of col.querySelectorAll('*')) {
    if (el.offsetParent !== null && el.getBoundingClientRect().right > edge) out.push(el.id || el.tagName);
  }
}
return out;
"""


def test_long_file_name_stays_inside_the_page(browser, models: dict[str, Path], small_png: Path,
                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    long_name = tmp_path / ("00000001_000_" + "very_long_export_name_" * 10 + "end.png")  # 243 characters
    shutil.copy(small_png, long_name)
    predictor = Predictor(models["backbone"], models["linear"], device="cpu")
    wait = WebDriverWait(browser, 30)
    with BackgroundServer(create_app(predictor)) as url:
        for width in (1280, 420):  # side by side, and a phone where the findings panel wraps below
            browser.set_window_size(width, 900)
            browser.get(url + "/")
            browser.find_element(By.ID, "file").send_keys(str(long_name))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#findings li")) == len(NIH14))
            assert long_name.name in browser.find_element(By.ID, "image-info").text.replace("\n", "")
            assert browser.execute_script(OVERFLOW_JS) == [], width
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "page_long_name_narrow.png"))


def test_page_and_docs_run_under_their_content_security_policy(browser, models: dict[str, Path]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    predictor = Predictor(models["backbone"], models["linear"], device="cpu")
    wait = WebDriverWait(browser, 30)
    with BackgroundServer(create_app(predictor)) as url:
        browser.get(url + "/")
        wait.until(lambda d: "findings" in d.find_element(By.ID, "model-summary").text)  # app.js ran
        assert _csp_violations(browser) == []
        # The policy is enforced, not just sent: an injected inline script does not run.
        ran = browser.execute_script("""
            const s = document.createElement('script');
            s.textContent = 'window.__inlineRan = true;';
            document.body.append(s);
            return window.__inlineRan === true;""")
        assert ran is False
        assert any("Content Security Policy" in m for m in
                   [e["message"] for e in browser.get_log("browser")])  # reported as a violation

        browser.get(url + "/docs")  # readable offline: no CDN script to wait for
        ops = browser.find_elements(By.CSS_SELECTOR, "section.op h2")
        assert len(ops) >= 5 and any("/v1/predict" in h.text for h in ops)
        assert browser.find_element(By.CSS_SELECTOR, "section.op").is_displayed()
        assert _csp_violations(browser) == []
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "docs.png"))


def _uninformative_head(models: dict[str, Path], tmp_path: Path) -> Path:
    """The serve tests' linear head with thresholds of 0 (every finding would be POSITIVE) and the verdict
    `adapt` writes for a head whose outputs barely vary (chexfound.stats.informative)."""
    import torch

    from chexfound.adapt import load_head, save_head
    from chexfound.models.format import read_meta

    head = load_head(models["linear"])
    head.thresholds.fill_(0.0)
    head.informative = {"informative": False, "reason": "none of its 14 findings is informative on validation",
                        "rule": "test", "findings": [{"finding": f, "informative": False,
                                                      "reasons": ["outputs barely vary (logit spread 0.002 < 0.1)"]}
                                                     for f in head.findings]}
    meta = read_meta(models["linear"])
    path = tmp_path / "flat.safetensors"
    with torch.no_grad():
        save_head(head, path, backbone_sha256=meta["backbone_sha256"], backbone_config=meta["backbone_config"])
    return path


def test_an_uninformative_model_shows_a_banner_and_no_positive_badge(browser, models: dict[str, Path],
                                                                     data_root: Path, tmp_path: Path) -> None:
    """The quick demo's near-constant head showed red POSITIVE badges that changed between uploads of similar
    images; now the page says the model is uninformative and calls nothing. A MONOCHROME1 header over pixels
    that look inverted is shown with a warning."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    predictor = Predictor(models["backbone"], _uninformative_head(models, tmp_path), device="cpu")
    wait = WebDriverWait(browser, 30)
    with BackgroundServer(create_app(predictor)) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-banner").is_displayed())
        assert "uninformative" in browser.find_element(By.ID, "model-banner").text
        browser.find_element(By.ID, "file").send_keys(str(data_root / "dicom" / "Fake_MONOHR1.dcm"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#findings li")) == len(NIH14))
        assert browser.find_elements(By.CSS_SELECTOR, "#findings li.positive") == []
        assert len(browser.find_elements(By.CSS_SELECTOR, "#findings li.nocall")) == len(NIH14)
        assert "no calls" in browser.find_element(By.ID, "status").text
        warning = browser.find_element(By.ID, "image-warning")
        assert warning.is_displayed() and "MONOCHROME1" in warning.text
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "page_uninformative.png"))
        # A correctly stored MONOCHROME1 file: no warning.
        browser.find_element(By.ID, "file").send_keys(str(data_root / "dicom" / "CR-MONO1-10-chest.dcm"))
        wait.until(lambda d: "CR-MONO1" in d.find_element(By.ID, "status").text
                   and "Analysing" not in d.find_element(By.ID, "status").text)
        assert not browser.find_element(By.ID, "image-warning").is_displayed()
        assert _csp_violations(browser) == []
