"""The service's page in headless Chromium: upload a real image, see the overlay, move the threshold."""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mudenet_core import tracking

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MPDD_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mpdd" / "metal_plate" / "test"
MODEL_ID = "models:/ae-synthetic-plate/1"


def _binary(default: Path, name: str) -> Path | None:
    return default if default.is_file() else (Path(p) if (p := shutil.which(name)) else None)


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    binary, drv_path = _binary(CHROMIUM, "chromium"), _binary(CHROMEDRIVER, "chromedriver")
    if binary is None or drv_path is None:
        pytest.skip("headless Chromium not available (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(binary)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(str(drv_path)), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(driver, synthetic_root, tmp_path_factory, one_thread):
    """A smoke AE trained by the CLI into a temporary registry, served by uvicorn in a thread."""
    import uvicorn

    from mudenet_core import cli
    from mudenet_core.serve import create_app

    tmp = tmp_path_factory.mktemp("serve_browser")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.ENV_SWITCH, "1")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        assert cli.main(["train", "--method", "ae", "--profile", "smoke", "--data-root", str(synthetic_root),
                         "--category", "plate", "--output-dir", str(tmp / "ae"), "--no-progress",
                         "--threads", "1"]) == 0
        app = create_app(model_id=MODEL_ID, tracking_uri=uri, token="")
        port = _free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        deadline = time.time() + 30
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        assert srv.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
        srv.should_exit = True
        th.join(timeout=10)


def _image(synthetic_root: Path) -> Path:
    """A real MPDD metal_plate test image where the data is present, else a generated one."""
    if MPDD_TEST.is_dir():
        found = sorted(p for p in MPDD_TEST.rglob("*.png"))
        if found:
            return found[0]
    return sorted((synthetic_root / "plate" / "test").rglob("*.png"))[0]


def _set(driver, element_id: str, value: float) -> float:
    """Move a slider as a user would (value + input event); returns the value the slider took."""
    return float(driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = String(arguments[1]);"
        "s.dispatchEvent(new Event('input')); return s.value;", element_id, value))


def _checksum(driver) -> float:
    return float(driver.execute_script(
        "const c = document.getElementById('view');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7;"
        " return s;"))


def _expected_boxes(m: dict, t: float) -> int:
    """Regions of the dequantised map at t, by skimage (8-connectivity): what the page must draw."""
    from skimage import measure

    q = np.frombuffer(base64.b64decode(m["data"]), np.uint8).reshape(m["shape"])
    values = (m["min"] + q.astype(np.float64) * ((m["max"] - m["min"]) / 255)).astype(np.float32)
    return int(measure.label(values.astype(np.float64) >= t, connectivity=2).max())


def test_upload_overlay_and_threshold_slider(driver, server, synthetic_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: MODEL_ID in d.find_element(By.ID, "status").text)

    def options(d):  # the registry listing arrives in its own request, after the status
        return [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model-select option")]

    wait.until(lambda d: MODEL_ID in options(d))
    driver.find_element(By.ID, "file-input").send_keys(str(_image(synthetic_root)))
    wait.until(lambda d: d.find_element(By.ID, "view").get_attribute("data-drawn") == "1")
    assert driver.find_element(By.ID, "result").is_displayed()
    r = driver.execute_script("return window.mudenet.state.current.r;")
    score, threshold = float(r["score"]), float(r["threshold"])
    decision = driver.find_element(By.ID, "decision").text
    assert decision == ("anomalous" if score >= threshold else "normal")

    # the heat map is drawn over the image: the canvas changes with the opacity slider
    _set(driver, "opacity", 0.0)
    plain = _checksum(driver)
    _set(driver, "opacity", 1.0)
    assert _checksum(driver) != plain

    # below the score the image is anomalous, above it normal; boxes follow the map at each threshold
    span = abs(score) * 0.2 + 1e-6
    for target in (score - span, score + span):
        t = _set(driver, "threshold", target)
        want = "anomalous" if score >= t else "normal"
        assert driver.find_element(By.ID, "decision").text == want
        boxes = int(driver.find_element(By.ID, "view").get_attribute("data-boxes"))
        assert boxes == _expected_boxes(r["map"], t)
        assert driver.find_element(By.ID, "n-regions").text == str(boxes)
    low = _set(driver, "threshold", float(r["map"]["min"]) - 1.0)
    assert low < score and driver.find_element(By.ID, "decision").text == "anomalous"
    assert int(driver.find_element(By.ID, "view").get_attribute("data-boxes")) == 1  # the whole map: 1 region


def test_batch_table_and_csv(driver, server, synthetic_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: MODEL_ID in d.find_element(By.ID, "status").text)
    paths = sorted((synthetic_root / "plate" / "test").rglob("*.png"))[:3]
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-table tbody tr")) == 3)
    assert driver.find_element(By.ID, "batch").is_displayed()
    csv = driver.execute_script("return window.mudenet.batchCsv();").strip().splitlines()
    assert csv[0] == "filename,score,threshold,decision,regions,error" and len(csv) == 4
    assert [line.split(",")[0] for line in csv[1:]] == [p.name for p in paths]
