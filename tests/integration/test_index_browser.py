"""The static results index opens in headless Chromium and its tables are visible (no Jupyter, no server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mudenet_core import category_report, report, report_html
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


def _category_run(run: Path, data: Path, method: str) -> None:
    """Per-image outputs of one method (scores, 8 px maps) and the split index with real 16 px PNGs."""
    data.mkdir(parents=True, exist_ok=True)
    index, scores = [], []
    for i, label in enumerate([0, 0, 1, 1]):
        img = np.full((16, 16, 3), 100, np.uint8)
        mask_path = ""
        if label:
            img[4:8, 4:8] = 250
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = 255
            mask_path = str(data / f"{i}_mask.png")
            Image.fromarray(mask).save(mask_path)
        Image.fromarray(img).save(data / f"{i}.png")
        defect = "hole" if label else "good"
        row = {"image_path": str(data / f"{i}.png"), "label": label, "defect_type": defect}
        index.append({**row, "mask_path": mask_path, "category": "plate", "split": "test"})
        scores.append({**row, "category": "plate", "score": 0.2 * i + (0.1 if method == "padim" else 0.0)})
    save_csv(run / "splits" / "synthetic_plate.csv", pd.DataFrame(index))
    save_csv(run / "eval" / method / "scores.csv", pd.DataFrame(scores))
    maps = np.zeros((4, 8, 8), np.float16)
    maps[2:, 2:4, 2:4] = 1.0
    np.save(run / "eval" / method / "maps.npy", maps)


@pytest.fixture
def profile_dir(tmp_path) -> Path:
    rows = []
    for method, base in (("mudenet", 0.95), ("padim", 0.9)):
        for cat in ("plate", "weave"):
            for seed in (0, 1):
                for split, shift in (("val", -0.1), ("test", 0.0)):
                    for metric in ("image_auroc", "pixel_auroc", "au_pro"):
                        rows.append(
                            {
                                "method": method,
                                "dataset": "synthetic",
                                "category": cat,
                                "seed": seed,
                                "split": split,
                                "metric": metric,
                                "value": base - 0.01 * seed + shift,
                                "config_hash": "h",
                                "git_sha": "s",
                            }
                        )
    # MuDeNet on MVTec AD cable with the paper's backbone: compared with the published cable numbers
    for metric, value in (("image_auroc", 0.97), ("pixel_auroc", 0.98), ("au_pro", 0.90)):
        rows.append({"method": "mudenet", "dataset": "mvtec_ad", "category": "cable", "seed": 0,
                     "split": "test", "metric": metric, "value": value, "config_hash": "md", "git_sha": "s"})
    cable = tmp_path / "runs" / "mvtec_ad" / "cable" / "seed0" / "eval" / "mudenet"
    cable.mkdir(parents=True)
    info = {"config": {"backbone": "wide_resnet50_2"}, "config_hash": "md"}
    (cable / "metrics.json").write_text(json.dumps(info))
    df = pd.DataFrame(rows)
    for (ds, cat, seed, method), part in df.groupby(["dataset", "category", "seed", "method"]):
        save_csv(tmp_path / "runs" / ds / cat / f"seed{seed}" / "tables" / f"metrics_{method}.csv", part)
    for method in ("mudenet", "padim"):
        _category_run(tmp_path / "runs" / "synthetic" / "plate" / "seed0", tmp_path / "data", method)
    report.build_tables(tmp_path)
    run_html = tmp_path / "runs" / "synthetic" / "plate" / "seed0" / "30_evaluation.html"
    run_html.write_text("<html><body><h1>30 evaluation</h1></body></html>")
    category_report.write_category_pages(tmp_path)
    report_html.write_index(tmp_path, title="Browser test")
    return tmp_path


def test_index_tables_visible_in_chromium(driver, profile_dir):
    from selenium.webdriver.common.by import By

    driver.get((profile_dir / "index.html").as_uri())
    assert driver.title == "Browser test"
    head = driver.find_element(By.ID, "tbl-synthetic-headline")
    assert head.is_displayed()
    header = [th.text for th in head.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header[:3] == ["method", "image AUROC · val", "image AUROC · test"]
    table = driver.find_element(By.ID, "tbl-synthetic-image_auroc")
    assert table.is_displayed() and table.size["height"] > 50
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert header == ["category", "mudenet", "padim"]
    body = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    assert body[-1][0] == "Mean" and body[-1][1] == "94.5 ± 0.7"  # seeds .95/.94 in both categories (test)
    pvo = driver.find_element(By.ID, "tbl-paper-vs-ours")
    assert pvo.is_displayed() and "mudenet" in pvo.text and "cable" in pvo.text and "-1.9" in pvo.text
    assert "PatchCore-10%" in driver.find_element(By.ID, "paper-not-run").text
    link = driver.find_element(By.PARTIAL_LINK_TEXT, "30_evaluation.html")
    link.click()
    assert driver.find_element(By.TAG_NAME, "h1").text == "30 evaluation"


def test_category_page_opens_from_the_index(driver, profile_dir):
    from selenium.webdriver.common.by import By

    driver.get((profile_dir / "index.html").as_uri())
    driver.find_element(By.LINK_TEXT, "synthetic / plate").click()
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("synthetic / plate")
    methods = driver.find_element(By.ID, "tbl-methods")
    assert methods.is_displayed()
    trs = methods.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [tr.find_element(By.TAG_NAME, "td").text for tr in trs] == ["mudenet", "padim"]
    images = driver.find_elements(By.TAG_NAME, "img")
    assert {Path(i.get_attribute("src")).name for i in images} >= {"roc.png", "pro.png", "hardest.png"}
    for img in images:  # every figure loads (a broken link has naturalWidth 0)
        assert driver.execute_script("return arguments[0].naturalWidth", img) > 0
    driver.find_element(By.PARTIAL_LINK_TEXT, "all results").click()
    assert driver.title == "Browser test"
