"""Save a screenshot of the inference page (``mudenet serve``) for the README, with headless Chromium.

Usage::

    .venv/bin/python scripts/screenshot_serve.py --url http://127.0.0.1:8000 --image a.png --out serve.png

The service must be running with a model loaded (``mudenet serve --model ID``). The page is opened, the image
is uploaded, and once the overlay is drawn the window is saved as a PNG. Needs selenium and chromium +
chromium-driver (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Open the page, upload ``--image``, wait for the overlay, save ``--out``; 2 on a user error."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    p.add_argument("--image", type=Path, required=True, help="image to upload")
    p.add_argument("--out", type=Path, default=Path("serve_screenshot.png"), help="PNG to write")
    p.add_argument("--opacity", type=float, default=0.5, help="heat-map opacity in the screenshot")
    args = p.parse_args(argv)
    if not args.image.is_file():
        print(f"screenshot_serve: no such image: {args.image}", file=sys.stderr)
        return 2
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        print("screenshot_serve: chromium and chromedriver are needed (apt-get install chromium "
              "chromium-driver)", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        d.get(args.url.rstrip("/") + "/")
        wait = WebDriverWait(d, 60)
        wait.until(lambda x: "no model" not in x.find_element(By.ID, "status").text
                   and "connecting" not in x.find_element(By.ID, "status").text)
        d.find_element(By.ID, "file-input").send_keys(str(args.image.resolve()))
        wait.until(lambda x: x.find_element(By.ID, "view").get_attribute("data-drawn") == "1")
        d.execute_script("const s = document.getElementById('opacity'); s.value = String(arguments[0]);"
                         "s.dispatchEvent(new Event('input'));", args.opacity)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp.png")
        d.save_screenshot(str(tmp))
        tmp.replace(args.out)  # atomic: never a half-written screenshot
    finally:
        d.quit()
    print(f"screenshot_serve: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
