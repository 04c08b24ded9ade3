"""Remake the README's two pictures from the real product: docs/demo_overlay.png and docs/serve_page.png.

1. ``oilleak demo --out OUT`` runs; the val overlay with the most instances, scaled to 900 px wide, becomes
   docs/demo_overlay.png.
2. ``oilleak serve`` runs the demo's trained checkpoint on 127.0.0.1; headless chromium (Selenium, as
   tests/test_serve_page.py) opens the page, drops that val photo on it and waits for the leaks table; the
   screenshot becomes docs/serve_page.png.

    .venv/bin/python bench/readme_pictures.py [--out /tmp/readme_demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OILLEAK = [sys.executable, "-m", "oilleak"]


def run_demo(out: Path) -> tuple[Path, Path]:
    """The demo's checkpoint and the val photo whose overlay has the most instances."""
    subprocess.run([*OILLEAK, "demo", "--out", str(out), "--device", "cpu"], check=True)
    records = [json.loads(p.read_text()) for p in (out / "predictions" / "instances").glob("*.json")]
    best = max(records, key=lambda r: len(r["instances"]))
    overlay = out / "predictions" / "overlays" / f"{Path(best['source']).stem}.jpg"
    with Image.open(overlay) as image:
        image.resize((900, round(image.height * 900 / image.width)), Image.LANCZOS).save(REPO / "docs" / "demo_overlay.png", optimize=True)
    checkpoint = next(p for p in (out / "train" / "best.pth", out / "train" / "latest.pth") if p.is_file())
    return checkpoint, Path(best["source"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot_page(checkpoint: Path, photo: Path, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen([*OILLEAK, "serve", str(checkpoint), "--port", str(port), "--device", "cpu"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                    f"--user-data-dir={out / 'chromium-profile'}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: checkpoint.name in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "files").send_keys(str(photo.resolve()))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result table.leaks tbody tr"))
            time.sleep(1)  # the overlay's last paint
            driver.save_screenshot(str(out / "page.png"))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(60)
    with Image.open(out / "page.png") as image:
        image.convert("RGB").save(REPO / "docs" / "serve_page.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/readme_demo"))
    args = parser.parse_args()
    checkpoint, photo = run_demo(args.out)
    screenshot_page(checkpoint, photo, args.out)
    print("wrote docs/demo_overlay.png and docs/serve_page.png")


if __name__ == "__main__":
    main()
