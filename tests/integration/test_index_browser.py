"""The static results index opens in headless Chromium and its tables are visible (no Jupyter, no server)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mudenet_core import report
from mudenet_core.io import save_csv

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    binary = CHROMIUM if CHROMIUM.is_file() else (Path(p) if (p := shutil.which("chromium")) else None)
    drv_path = (
        CHROMEDRIVER if CHROMEDRIVER.is_file() else (Path(p) if (p := shutil.which("chromedriver")) else None)
    )
    if binary is None or drv_path is None:
        pytest.skip("headless Chromium not available (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(binary)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,2000",
    ):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(str(drv_path)), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture
def profile_dir(tmp_path) -> Path:
    rows = []
    for method, base in (("mudenet", 0.95), ("padim", 0.9)):
        for cat in ("plate", "weave"):
            for seed in (0, 1):
                for metric in ("image_auroc", "pixel_auroc", "au_pro"):
                    rows.append(
                        {
                            "method": method,
                            "dataset": "synthetic",
                            "category": cat,
                            "seed": seed,
                            "metric": metric,
                            "value": base - 0.01 * seed,
                            "config_hash": "h",
                            "git_sha": "s",
                        }
                    )
    df = pd.DataFrame(rows)
    for (cat, seed, method), part in df.groupby(["category", "seed", "method"]):
        save_csv(
            tmp_path / "runs" / "synthetic" / cat / f"seed{seed}" / "tables" / f"metrics_{method}.csv", part
        )
    report.build_tables(tmp_path)
    run_html = tmp_path / "runs" / "synthetic" / "plate" / "seed0" / "30_evaluation.html"
    run_html.write_text("<html><body><h1>30 evaluation</h1></body></html>")
    report.write_index(tmp_path, title="Browser test")
    return tmp_path


def test_index_tables_visible_in_chromium(driver, profile_dir):
    from selenium.webdriver.common.by import By

    driver.get((profile_dir / "index.html").as_uri())
    assert driver.title == "Browser test"
    table = driver.find_element(By.ID, "tbl-synthetic-image_auroc")
    assert table.is_displayed() and table.size["height"] > 50
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header == ["category", "mudenet", "padim"]
    body = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    assert body[-1][0] == "Mean" and body[-1][1] == "94.5 ± 0.7"  # seeds .95/.94 in both categories
    pvo = driver.find_element(By.ID, "tbl-paper-vs-ours")
    assert pvo.is_displayed() and "mudenet" in pvo.text
    link = driver.find_element(By.PARTIAL_LINK_TEXT, "30_evaluation.html")
    link.click()
    assert driver.find_element(By.TAG_NAME, "h1").text == "30 evaluation"
