"""A screenshot of the `argen serve` page after generating (and inpainting), taken by headless Chromium (the README's
docs/serve.png).

    python benchmarks/serve_screenshot.py --pipeline runs/demo/gpt_run/final -o docs/serve.png \
        --prompt "a small blue circle above a small red circle" -n 8 --seed 0 \
        --inpaint "a small blue circle above a small yellow square" --size 1100,980

Starts `argen serve` on a free loopback port, types the prompt and the number of images, clicks Generate and waits for
the images. With --inpaint it then clicks Inpaint under image --inpaint-image, paints --stroke on the editor's canvas
with the mouse (a polyline in fractions of the image's width and height), types the prompt, clicks the editor's
Inpaint and waits for the new images. Then it saves the window. Needs Debian's chromium and chromium-driver, and
selenium.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# root in a container on a closed network: no sandbox, and none of Chromium's own connections
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", required=True)
    p.add_argument("--unclip", default=None)
    p.add_argument("--prompt", default="a small blue circle above a small red circle")
    p.add_argument("-n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="1100,560", help="window width,height in pixels")
    p.add_argument("--inpaint", default=None, metavar="PROMPT", help="then inpaint the stroke's region under PROMPT")
    p.add_argument("--inpaint-image", type=int, default=0, help="which generated image to inpaint (default 0)")
    p.add_argument("--stroke", default="0.1,0.45,0.25,0.45,0.25,0.6,0.1,0.6",
                   help="x,y,x,y,... in fractions of the image: the mouse path painted (default: over the lower-left "
                        "object of the demo's default prompt)")
    p.add_argument("--brush", type=int, default=32, help="brush width in the editor's 256 px canvas (default 32)")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/serve.png"))
    args = p.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "argen", "serve", "--pipeline", args.pipeline, "--port", str(port),
                               *(["--unclip", args.unclip] if args.unclip else [])])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("argen serve exited") from None
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as profile:
            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}"):
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
            try:
                wait = WebDriverWait(driver, 300)
                driver.get(url)
                wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ready")
                driver.find_element(By.ID, "prompt").send_keys(args.prompt)
                for name, value in (("job-n", args.n), ("job-seed", args.seed)):
                    field = driver.find_element(By.ID, name)
                    field.clear()
                    field.send_keys(str(value))
                shown_job = lambda d: d.find_element(By.ID, "zip").get_attribute("href").split("/")[-2]
                done_after = lambda job: lambda d: (
                    d.find_element(By.ID, "status").get_attribute("data-state") == "done" and shown_job(d) != job
                    and d.execute_script("return Array.from(document.querySelectorAll('#results img'))"
                                         ".every((i) => i.complete && i.naturalWidth > 0)"))
                driver.find_element(By.ID, "generate").click()
                wait.until(done_after(""))
                if args.inpaint is not None:
                    driver.find_element(By.CSS_SELECTOR, f'#column-gpt figure[data-index="{args.inpaint_image}"] '
                                                         "button.tool").click()
                    driver.execute_script(f"document.getElementById('editor-brush').value = {args.brush}")
                    canvas = driver.find_element(By.ID, "editor-mask")
                    side = canvas.size["width"]
                    xy = [float(v) * side for v in args.stroke.split(",")]
                    points = [(round(x - side / 2), round(y - side / 2)) for x, y in zip(xy[::2], xy[1::2])]
                    chain = ActionChains(driver).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
                    for (x0, y0), (x1, y1) in zip(points, points[1:]):
                        chain = chain.move_by_offset(x1 - x0, y1 - y0)
                    chain.release().perform()
                    prompt = driver.find_element(By.ID, "editor-prompt")
                    prompt.clear()
                    prompt.send_keys(args.inpaint)
                    generated = shown_job(driver)
                    driver.find_element(By.ID, "editor-run").click()
                    wait.until(done_after(generated))
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
