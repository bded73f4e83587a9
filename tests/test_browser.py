"""The web page in a real browser: real gunicorn, real models, headless Chromium driven by selenium.

For every model shipped in model_store/ the page is loaded, the model picked, a generated image uploaded through
``#file-input``, and what the page shows is checked against the API called directly with the same bytes:

1. the probabilities shown are the ones ``POST /v1/models/<name>/classify`` returns (to 1e-6), and the label;
2. every stage of ``POST /v1/models/<name>/inspect`` is drawn, in order, with its kind and shape: feature maps as a
   decoded <img> of the API's grid, 1-D stages as a strip holding every value;
3. the class activation map is drawn when the API gives one (and follows the class selector), and is absent otherwise;
4. the first-layer filters image is drawn;
5. the browser console logged no error;
6. the page contacted nothing but this server (data: and blob: URLs aside).

A full-page screenshot per model is saved to artifacts/browser-<model>.png. Chromium and chromedriver are required:
the test fails, never skips, when they are missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from service.settings import Settings
from tests.helpers import free_port, wait_for, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODEL_STORE = REPO / "model_store"
ARTIFACTS = REPO / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BINARY", "/usr/bin/chromedriver")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
WAIT_S = 60
WINDOW = (1440, 900)  # width of the screenshots; their height is the whole page


def shipped_models() -> list[str]:
    """Models with at least one version folder holding a model.onnx: what the server will list."""
    return sorted(folder.name for folder in MODEL_STORE.iterdir()
                  if folder.is_dir() and any((version / "model.onnx").is_file() for version in folder.iterdir()))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real gunicorn process of the service on a free port; yields its base URL."""
    port = free_port()
    gunicorn = Path(sys.executable).parent / "gunicorn"
    # No gRPC: the page does not use it, and its default port may be taken by a server the developer runs.
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "WORKERS": "1", "MODEL_STORE": str(MODEL_STORE),
           "GRPC_PORT": "0"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    models = shipped_models()
    if (env.get("DEFAULT_MODEL") or Settings().DEFAULT_MODEL) not in models:
        env["DEFAULT_MODEL"] = models[0]  # e.g. before convnet is trained: readiness needs the default model
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(gunicorn), "-c", "python:service.gunicorn_config"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(f"{base}/readyz", timeout=90, process=process)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"the server did not become ready: {exc}\n{log_path.read_text()[-3000:]}", pytrace=False)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(path) and os.access(path, os.X_OK))]
    if missing:
        pytest.fail(f"The browser test needs Chromium and chromedriver; missing: {', '.join(missing)}. "
                    "Install them (Debian/Ubuntu: apt-get install chromium chromium-driver) or point "
                    "CHROMIUM_BINARY / CHROMEDRIVER_BINARY at them.", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-default-apps", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_window_size(*WINDOW)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """A 64×64 PNG with a simple pattern: sky, sea and a boat-ish shape."""
    image = Image.new("RGB", (64, 64), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 40, 63, 63), fill=(30, 80, 160))
    draw.polygon([(10, 42), (54, 42), (46, 52), (18, 52)], fill=(120, 60, 20))
    draw.rectangle((31, 8, 33, 42), fill=(60, 40, 20))
    draw.polygon([(34, 10), (50, 38), (34, 38)], fill=(250, 250, 245))
    path = tmp_path_factory.mktemp("images") / "boat.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def image_host():
    """A second local server (another origin) serving PNGs, with CORS under /cors/ and without it under /plain/."""
    images = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = images.get(self.path.rsplit("/", 1)[-1])
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png" if body else "text/plain")
            if self.path.startswith("/cors/"):
                self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", images
    finally:
        httpd.shutdown()
        httpd.server_close()


def pattern_png(seed: int) -> bytes:
    """A 64×64 PNG, a different simple pattern per seed."""
    colours = [(200, 60, 40), (40, 160, 70), (60, 60, 200), (220, 200, 60)]
    image = Image.new("RGB", (64, 64), colours[seed % 4])
    draw = ImageDraw.Draw(image)
    for step in range(0, 64, 8 + seed):
        draw.line((0, step, 63, 63 - step), fill=colours[(seed + 1) % 4], width=3)
    draw.ellipse((16 + seed, 16, 44, 44 - seed), fill=colours[(seed + 2) % 4])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ helpers


def page_state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def page_error(driver) -> str:
    return driver.execute_script(
        "const box = document.querySelector('#status'); return box && !box.hidden ? box.innerText : ''")


def wait_for_state(driver, expected: str, what: str) -> None:
    def settled():
        current = page_state(driver)
        if current == "error":
            raise AssertionError(f"the page shows an error while {what}: {page_error(driver)}")
        return current == expected

    wait_until(settled, f"data-state={expected} ({what})")


def image_info(driver, selector: str) -> dict | None:
    return driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return img && {src: img.src, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,"
        "complete: img.complete};", selector)


def png_size(data_url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call, from Chromium's network events."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def severe_console_entries(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6


def save_full_page(driver, path: Path) -> None:
    """A screenshot of the whole page at the window's width (Chromium's DevTools capture)."""
    size = driver.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
    })
    path.write_bytes(base64.b64decode(shot["data"]))


# ------------------------------------------------------------------------------------------------ tests


def test_every_served_model_is_tested(server):
    served = [model["name"] for model in requests.get(f"{server}/v1/models", timeout=10).json()["models"]]
    assert served == shipped_models(), "the models the server lists must be the ones this test is parametrized on"


@pytest.mark.parametrize("model", shipped_models())
def test_page_shows_what_the_network_sees(server, driver, image_file, model):
    image_bytes = image_file.read_bytes()
    headers = {"Content-Type": "image/png"}
    listed = {entry["name"]: entry for entry in requests.get(f"{server}/v1/models", timeout=10).json()["models"]}
    assert model in listed and listed[model]["default_version"], f"{model} is not served"
    classified = requests.post(f"{server}/v1/models/{model}/classify", data=image_bytes, headers=headers, timeout=30)
    inspected = requests.post(f"{server}/v1/models/{model}/inspect", data=image_bytes, headers=headers, timeout=30)
    filters = requests.get(f"{server}/v1/models/{model}/filters", timeout=30)
    for response in (classified, inspected, filters):
        assert response.status_code == 200, response.text
    expected = classified.json()["predictions"][0]
    inspection = inspected.json()

    driver.get_log("browser")  # drop what earlier tests left
    driver.get_log("performance")
    driver.get(f"{server}/")
    wait_until(lambda: driver.execute_script(
        "const s = document.querySelector('#model-select'); return s && !s.disabled"), "the model list")
    wait_for_state(driver, "idle", "loading the page")

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    select = Select(driver.find_element(By.ID, "model-select"))
    options = [option.get_attribute("value") for option in select.options]
    assert options == list(listed), "the model selector lists the served models"
    default = requests.get(f"{server}/v1/models", timeout=10).json()["default_model"]
    if default in listed:
        assert select.first_selected_option.get_attribute("value") == default, "the default model is preselected"
    select.select_by_value(model)
    wait_for_state(driver, "idle", f"switching to {model}")
    driver.find_element(By.ID, "file-input").send_keys(str(image_file))
    wait_until(lambda: driver.execute_script(
        "return document.querySelector('#result').dataset.model") == model and page_state(driver) != "loading",
        f"the result of {model}")
    wait_for_state(driver, "ready", f"classifying with {model}")

    # 1. the probabilities and the label are the API's
    shown = driver.execute_script(
        "return [...document.querySelectorAll('#probabilities [data-label]')]"
        ".map(row => [row.dataset.label, row.dataset.probability]);")
    assert [label for label, _ in shown] == list(expected["probabilities"]), "one row per class, in label order"
    for label, probability in shown:
        assert close(float(probability), expected["probabilities"][label]), (label, probability, expected)
    assert driver.find_element(By.ID, "prediction-label").text.lower() == expected["label"]
    assert driver.find_element(By.ID, "domain-warning").is_displayed() == (not expected["in_domain"])

    # 2. every stage, in order, with kind and shape; maps as decoded images of the API's grid, vectors as strips
    cards = driver.execute_script(
        "return [...document.querySelectorAll('#pipeline .stage')].map(card => ({name: card.dataset.stageName,"
        "kind: card.dataset.kind, shape: card.dataset.shape, text: card.innerText,"
        "img: (() => { const img = card.querySelector('img');"
        "  return img && {src: img.src, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,"
        "    rendering: getComputedStyle(img).imageRendering, width: img.getBoundingClientRect().width}; })(),"
        "values: [...card.querySelectorAll('[data-value]')].map(cell => Number(cell.dataset.value))}));")
    stages = [{"name": "input", "kind": "input", "shape": inspection["input"]["shape"]}, *inspection["stages"]]
    assert [card["name"] for card in cards] == [stage["name"] for stage in stages], "one card per stage, in order"
    for card, stage in zip(cards, stages):
        where = f"{model} stage {stage['name']}"
        assert card["kind"] == stage["kind"], where
        assert card["shape"] == "x".join(map(str, stage["shape"])), where
        assert " × ".join(map(str, stage["shape"])) in card["text"], f"{where}: the shape is shown"
        if stage["kind"] == "input" or "maps" in stage:
            source = inspection["input"]["png"] if stage["kind"] == "input" else stage["maps"]["png"]
            assert card["img"], f"{where}: no <img>"
            assert card["img"]["naturalWidth"] > 0, f"{where}: the image did not decode"
            assert card["img"]["src"] == source, f"{where}: the image is not the API's"
            assert (card["img"]["naturalWidth"], card["img"]["naturalHeight"]) == png_size(source), where
            assert card["img"]["rendering"] == "pixelated", f"{where}: feature maps are drawn pixelated"
            assert card["img"]["width"] >= card["img"]["naturalWidth"], f"{where}: maps are upscaled, not shrunk"
        else:
            assert card["values"], f"{where}: no strip of values"
            assert len(card["values"]) == len(stage["values"]), where
            assert all(close(a, b) for a, b in zip(card["values"], stage["values"])), where
            if stage["kind"] != "softmax":  # values on hover
                middle = len(stage["values"]) // 2
                tip = driver.execute_script(
                    "const cell = document.querySelectorAll(`.stage[data-stage-name='${arguments[0]}'] [data-value]`)"
                    "[arguments[1]]; cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));"
                    "const tip = document.querySelector('#tooltip'), text = tip.hidden ? '' : tip.textContent;"
                    "cell.dispatchEvent(new MouseEvent('mouseleave')); cell.parentElement.dispatchEvent("
                    "new MouseEvent('mouseleave')); return text;",
                    stage["name"], middle)
                assert " = " in tip, f"{where}: hovering a value shows it"
                assert abs(float(tip.split(" = ")[1]) - stage["values"][middle]) <= 1e-4 * max(1, abs(
                    stage["values"][middle])), (where, tip)
    seen = image_info(driver, "#seen-input")
    assert seen and seen["naturalWidth"] == inspection["input"]["shape"][2], "the 32×32 input as the network sees it"

    # the screenshot (before the CAM class changes, and before the log checks so that a failure still leaves it)
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.execute_script("return document.querySelector('#tooltip').hidden"), "no tooltip left over"
    driver.execute_script("window.scrollTo(0, 0)")
    save_full_page(driver, ARTIFACTS / f"browser-{model}.png")

    # 3. the class activation map, when the model has one
    cam = inspection["cam"]
    if cam is None:
        assert image_info(driver, "#cam img") is None, "no CAM image for a model without one"
        assert "no class activation map" in driver.find_element(By.ID, "cam").text
    else:
        overlay = image_info(driver, "#cam img.cam-overlay")
        assert overlay and overlay["naturalWidth"] > 0 and overlay["src"] == cam["png"], "the CAM overlay"
        heatmap = image_info(driver, "#cam img.cam-heatmap")
        assert heatmap and heatmap["naturalWidth"] > 0 and heatmap["src"] == cam["heatmap_png"], "the CAM heat map"
        other = next(label for label in expected["probabilities"] if label != cam["label"])
        Select(driver.find_element(By.ID, "cam-class")).select_by_value(other)
        wait_until(lambda: driver.execute_script("return document.querySelector('#cam').dataset.label") == other,
                   f"the CAM for {other}")
        wait_for_state(driver, "ready", f"the CAM for {other}")
        for_other = requests.post(f"{server}/v1/models/{model}/inspect", params={"class": other}, data=image_bytes,
                                  headers=headers, timeout=30).json()["cam"]
        overlay = image_info(driver, "#cam img.cam-overlay")
        assert overlay["naturalWidth"] > 0 and overlay["src"] == for_other["png"], f"the CAM for {other}"

    # 4. the first-layer filters
    shown_filters = image_info(driver, "#filters img")
    assert shown_filters and shown_filters["naturalWidth"] > 0, "the filters image did not decode"
    assert shown_filters["src"] == filters.json()["filters"]["png"], "the filters image is not the API's"

    # 5. no errors in the console
    assert severe_console_entries(driver) == [], "the browser console logged errors"

    # 6. nothing but this server was contacted
    resources = driver.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(entry => entry.name)]")
    assert any(url.endswith("/static/app.js") for url in resources), "resource timing lists the page's own files"
    for url in resources + requested_urls(driver):
        parts = urlsplit(url)
        assert parts.scheme in ("data", "blob") or parts.hostname in LOCAL_HOSTS, f"the page requested {url}"


def test_an_image_of_none_of_the_labels_is_called_so(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    noise = tmp_path / "red.png"  # a flat red square
    Image.fromarray(np.tile(np.array([255, 0, 0], np.uint8), (64, 64, 1))).save(noise)
    answer = requests.post(f"{server}/v1/classify", data=noise.read_bytes(), headers={"Content-Type": "image/png"},
                           timeout=30).json()["predictions"][0]
    assert answer["in_domain"] is False
    driver.get(f"{server}/")
    wait_for_state(driver, "idle", "loading the page")
    driver.find_element(By.ID, "file-input").send_keys(str(noise))
    wait_for_state(driver, "ready", "classifying noise")
    warning = driver.find_element(By.ID, "domain-warning")
    assert warning.is_displayed()
    assert "doesn't look like a dog, cat, boat or bird" in warning.text, warning.text
    assert float(warning.get_attribute("data-domain-score")) == pytest.approx(answer["domain_score"], abs=1e-6)


def test_paste_drop_url_and_errors(server, driver, image_host):
    """The other ways in (paste, drop, a URL the browser fetches) and what the user sees when something fails."""
    from selenium.webdriver.common.by import By

    host, images = image_host
    headers = {"Content-Type": "image/png"}
    driver.get(f"{server}/")
    wait_for_state(driver, "idle", "loading the page")
    model = driver.execute_script("return document.querySelector('#model-select').value")

    def expect_result_of(source: str, data: bytes) -> None:
        wait_until(lambda: driver.execute_script("return document.querySelector('#result').dataset.source") == source
                   and page_state(driver) in ("ready", "error"), f"the result for {source}")
        wait_for_state(driver, "ready", source)
        answer = requests.post(f"{server}/v1/models/{model}/classify", data=data, headers=headers, timeout=30)
        expected = answer.json()["predictions"][0]["probabilities"]
        shown = driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#probabilities [data-label]')]"
            ".map(row => [row.dataset.label, row.dataset.probability]))")
        assert set(shown) == set(expected) and all(close(float(shown[k]), v) for k, v in expected.items()), source

    event_with_file = (
        "const [kind, b64, name] = arguments;"
        "const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));"
        "const transfer = new DataTransfer(); transfer.items.add(new File([bytes], name, {type: 'image/png'}));"
        "if (kind === 'paste') document.body.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer,"
        "  bubbles: true, cancelable: true}));"
        "else document.querySelector('#drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer,"
        "  bubbles: true, cancelable: true}));")

    pasted = pattern_png(1)
    driver.execute_script(event_with_file, "paste", base64.b64encode(pasted).decode(), "clipboard.png")
    expect_result_of("clipboard.png", pasted)

    dropped = pattern_png(2)
    driver.execute_script(event_with_file, "drop", base64.b64encode(dropped).decode(), "dropped.png")
    expect_result_of("dropped.png", dropped)

    fetched = pattern_png(3)
    images["fetched.png"] = fetched
    url_input = driver.find_element(By.ID, "url-input")
    url_input.clear()
    url_input.send_keys(f"{host}/cors/fetched.png")
    driver.find_element(By.ID, "url-button").click()
    expect_result_of("fetched.png", fetched)

    # A site without CORS: the browser may not read the image, and the page says so.
    url_input.clear()
    url_input.send_keys(f"{host}/plain/fetched.png")
    driver.find_element(By.ID, "url-button").click()
    wait_until(lambda: page_state(driver) == "error", "the CORS error")
    assert "CORS" in page_error(driver)
    assert driver.execute_script("return document.body.dataset.errorCode") == "cors"

    # An API error reaches the user with the API's own message.
    not_an_image = b"this is not an image"
    answer = requests.post(f"{server}/v1/models/{model}/classify", data=not_an_image, headers=headers, timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    driver.execute_script(event_with_file, "drop", base64.b64encode(not_an_image).decode(), "broken.png")
    wait_until(lambda: page_state(driver) == "error" and error["message"] in page_error(driver), "the API error")
    assert error["code"] in page_error(driver)
    assert driver.execute_script("return document.body.dataset.errorCode") == error["code"]
    assert driver.find_element(By.ID, "prediction-label").text == "—", "no stale prediction next to the error"


def test_the_page_asks_for_an_api_key_and_keeps_it_for_the_tab(driver, image_file, tmp_path):
    from tests.helpers import GunicornServer

    keyed = GunicornServer(tmp_path, WORKERS=1, DEFAULT_MODEL="lenet", API_KEYS="page-key")
    try:
        keyed.wait_ready()
        driver.get(keyed.url + "/")
        dialog_open = "return document.querySelector('#key-dialog').open"
        wait_until(lambda: driver.execute_script(dialog_open), "the key prompt after the API's 401")
        assert "needs an API key" in driver.find_element("id", "key-message").text
        ARTIFACTS.mkdir(exist_ok=True)
        save_full_page(driver, ARTIFACTS / "browser-api-key.png")
        driver.find_element("id", "key-input").send_keys("wrong-key")
        driver.find_element("id", "key-use").click()
        wait_until(lambda: "not accepted" in driver.find_element("id", "key-message").text
                   and driver.execute_script(dialog_open), "the prompt again for a wrong key")
        driver.find_element("id", "key-input").send_keys("page-key")
        driver.find_element("id", "key-use").click()
        wait_until(lambda: not driver.execute_script(dialog_open), "the prompt to close")
        wait_until(lambda: driver.execute_script("return !document.querySelector('#model-select').disabled"),
                   "the models to load with the key")
        assert driver.execute_script("return sessionStorage.getItem('convserve-api-key')") == "page-key"
        assert driver.execute_script("return localStorage.length") == 0  # this tab only, never kept on disk
        driver.find_element("id", "file-input").send_keys(str(image_file))
        wait_for_state(driver, "ready", "classifying with the key")
        assert driver.find_element("id", "prediction-label").text.lower() in ("dog", "cat", "boat", "bird")
    finally:
        keyed.stop()
        driver.execute_script("sessionStorage.clear()")
