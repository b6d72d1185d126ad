"""The playground page at /: served by teaserve itself, public while the API it calls keeps its key, and driven in a
real browser (Debian's chromium through playwright) against `teaserve serve` on the embedded model."""

import base64
import io
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import HeldServer, RunningServer, decode_b64_image, free_port, png_bytes, wait_until
from PIL import Image

from teaserve.cli.args import build_parser
from teaserve.engine import AsyncEngine
from teaserve.pipelines.testing import build_tiny_wan
from teaserve.server import build_app

API_KEY = "playground-key"
SERVE = [sys.executable, "-m", "teaserve", "serve"]
PAGE_FILES = {
    "/": "text/html; charset=utf-8",
    "/playground/playground.js": "text/javascript; charset=utf-8",
    "/playground/playground.css": "text/css; charset=utf-8",
}


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tiny_wan_t2v(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-t2v"), kind="t2v")


@pytest.fixture(scope="module")
def keyed_server(engine):
    with RunningServer(build_app(engine, api_key=API_KEY, shutdown_engine=False)) as server:
        yield server


# -- without a browser -----------------------------------------------------------------------------------------------
def test_the_page_and_its_files_are_public_with_their_content_types_and_a_content_security_policy(keyed_server):
    for path, content_type in PAGE_FILES.items():
        response = httpx.get(f"{keyed_server.url}{path}")
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
        # everything comes from this server: no CDN, no external font or script
        assert re.search(r"https?://", response.text) is None, path
    page = httpx.get(keyed_server.url).text
    assert '<script type="module" src="/playground/playground.js">' in page
    assert "innerHTML" not in httpx.get(f"{keyed_server.url}/playground/playground.js").text


def test_an_unknown_playground_file_is_a_404_in_openai_shape(keyed_server):
    response = httpx.get(f"{keyed_server.url}/playground/secrets.txt")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "the playground has no file 'secrets.txt'"


def test_the_api_the_page_calls_still_needs_the_key(keyed_server):
    models = f"{keyed_server.url}/v1/models"
    assert httpx.get(models).status_code == 401
    generation = httpx.post(f"{keyed_server.url}/v1/images/generations", json={"prompt": "x", "stream": True})
    assert generation.status_code == 401
    assert httpx.get(models, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_no_playground_serves_the_api_alone(engine):
    with RunningServer(build_app(engine, playground=False, shutdown_engine=False)) as server:
        for path in PAGE_FILES:
            assert httpx.get(f"{server.url}{path}").status_code == 404, path
        assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_the_serve_flag_turns_the_playground_off():
    parser = build_parser()
    assert parser.parse_args(["serve"]).playground is True
    assert parser.parse_args(["serve", "--no-playground"]).playground is False
    assert parser.parse_args(["serve", "--no-playground", "--playground"]).playground is True


# -- in a browser ----------------------------------------------------------------------------------------------------
def chromium_path() -> str:
    """Debian's chromium (or $TEASERVE_CHROMIUM); the test is skipped where there is none."""
    path = os.environ.get("TEASERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium found: install Debian's chromium package (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the screenshots go: $TEASERVE_TEST_ARTIFACTS/playground, else a pytest temporary folder."""
    given = os.environ.get("TEASERVE_TEST_ARTIFACTS")
    folder = Path(given) / "playground" if given else tmp_path_factory.mktemp("playground-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"playground screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_path()
    expect.set_options(timeout=120_000)
    with sync_playwright() as playwright:
        # --no-sandbox: as root, or in a container without user namespaces, Chromium's sandbox cannot start
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served_default_model(tmp_path_factory):
    """`teaserve serve` on the embedded model, with an API key."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [*SERVE, "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY, "--log-level", "warning"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=180)
        yield url
    finally:
        process.kill()
        process.wait(timeout=30)


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.set_default_timeout(120_000)  # a generation on a busy CPU
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None
    )
    page.goto(url)
    return page, problems


def strip_of(page, container: str) -> dict[str, str]:
    """The skip strip drawn in `container`, per branch, as C (computed) and S (skipped) marks."""
    return page.eval_on_selector_all(
        f"{container} .strip-row",
        """rows => Object.fromEntries(rows.map(row => [
            row.dataset.branch,
            [...row.querySelectorAll('.step')].map(cell => cell.classList.contains('skipped') ? 'S' : 'C').join(''),
        ]))""",
    )


def image_of(page, selector: str) -> np.ndarray:
    source = page.get_attribute(selector, "src")
    header, data = source.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.float64)


def details(page, selector: str) -> dict[str, str]:
    terms = page.locator(f"{selector} dt").all_inner_texts()
    return dict(zip(terms, page.locator(f"{selector} dd").all_inner_texts(), strict=True))


def test_the_page_generates_compares_and_shows_errors(browser, served_default_model, artifacts):
    from playwright.sync_api import expect

    page, problems = open_page(browser, served_default_model)
    # The page is public; the API answers 401 until the key is typed, and the page says so.
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == "invalid or missing API key: send 'Authorization: Bearer <key>'"
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model-info")).to_contain_text("teaserve/shapes-qwen-image")
    assert page.is_hidden("#error")
    assert page.text_content("#cache-backend") == "learned"
    # the embedded model's profile sets a quality target, which chooses the speedup of a request that sets neither
    assert page.get_attribute("#cache-quality_target", "placeholder") == "40"
    assert page.get_attribute("#cache-speedup", "placeholder") == "chosen for 40 dB"

    # Generate: previews arrive before the final image, which comes with its seed and the cache schedule.
    page.fill("#steps", "8")
    page.fill("#seed", "7")
    page.fill("#partial-images", "2")
    page.click("#run")
    page.wait_for_selector("#final-image[src]")
    assert page.locator("#event-log li").all_inner_texts() == ["partial image 1", "partial image 2", "final image"]
    assert page.locator("#previews img").count() == 2
    assert page.text_content("#progress-label") == "done"
    shown = details(page, "#result-details")
    assert shown["seed"] == "7" and shown["size"] == "64x64" and shown["steps"] == "8"
    page.screenshot(path=str(artifacts / "generate.png"), full_page=True)
    # The strip is the server's own schedule for the same request.
    same = httpx.post(
        f"{served_default_model}/v1/images/generations",
        json={"prompt": page.input_value("#prompt"), "num_inference_steps": 8, "seed": 7},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    ).json()
    expected = {name: branch["schedule"] for name, branch in same["cache"]["branches"].items()}
    assert strip_of(page, "#skip-strip") == expected
    assert set(expected) == {"cond", "uncond"} and all("S" in schedule for schedule in expected.values())
    assert np.array_equal(
        image_of(page, "#final-image"),
        np.asarray(
            Image.open(io.BytesIO(base64.b64decode(same["data"][0]["b64_json"]))).convert("RGB"), dtype=np.float64
        ),
    )

    # Compare: the same seed uncached and cached; the PSNR shown is the PSNR of the two images shown.
    page.click("#compare")
    page.wait_for_selector("#compare-details dd")
    compared = details(page, "#compare-details")
    assert compared["seed"] == "7"
    assert compared["uncached"] == "learned off: every step computed"
    assert re.fullmatch(r"learned: \d+ computed, \d+ skipped", compared["cached"])
    assert re.fullmatch(r"\d+\.\d\d\u00d7", compared["speedup"])  # a multiplication sign
    uncached, cached = image_of(page, "#compare-uncached"), image_of(page, "#compare-cached")
    mse = np.mean((uncached - cached) ** 2)
    assert mse > 0  # skipped steps change pixels
    assert compared["PSNR"] == f"{10 * math.log10(255**2 / mse):.2f} dB"
    assert strip_of(page, "#compare-strip") == expected
    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)

    # A refused request shows the server's message.
    page.fill("#size", "big")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("size must look like WIDTHxHEIGHT")
    assert page.text_content("#progress-label") == "failed"
    page.screenshot(path=str(artifacts / "error.png"), full_page=True)
    assert problems == []
    page.close()


def test_the_page_makes_a_video_and_plays_it(browser, tiny_wan_t2v, tmp_path, artifacts):
    from playwright.sync_api import expect

    server = HeldServer(tiny_wan_t2v, tmp_path, "--data-dir", str(tmp_path / "data"), held=False)
    try:
        server.wait_ready()
        page, problems = open_page(browser, server.url)
        expect(page.locator("#model-info")).to_contain_text("makes videos")
        assert page.is_checked("input[name=mode][value=video]") and page.is_hidden("input[name=mode][value=generate]")
        assert page.is_disabled("#compare")
        page.fill("#steps", "2")
        page.fill("#seed", "5")
        page.click("#run")
        page.wait_for_selector("#video-details dd")
        shown = details(page, "#video-details")
        assert shown["seed"] == "5"
        video = httpx.get(f"{server.url}/v1/videos/{shown['id']}").json()
        assert video["status"] == "completed"
        # the browser read the MP4 it was given
        length = float(shown["length"].removesuffix(" s"))
        assert length == pytest.approx(video["num_frames"] / video["fps"], abs=0.01)
        width, height = (int(side) for side in video["size"].split("x"))
        assert page.eval_on_selector("#video", "video => [video.videoWidth, video.videoHeight]") == [width, height]
        page.screenshot(path=str(artifacts / "video.png"), full_page=True)
        assert problems == []
        page.close()
    finally:
        server.stop()


def drop_files(page, selector: str, files: dict[str, bytes]) -> None:
    """Drop PNG files on `selector` as a user dragging them from a file manager would."""
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, b64] of Object.entries(files)) {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, {type: 'image/png'}));
            }
            return transfer;
        }""",
        {name: base64.b64encode(data).decode() for name, data in files.items()},
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def edit_in_page(browser, url, picked: dict[str, bytes], dropped: dict[str, bytes], mask: bytes | None):
    """Edit in the page: `picked` files chosen with the file input, `dropped` ones dropped, an optional mask."""
    page, problems = open_page(browser, url)
    page.check("input[name=mode][value=edit]")
    assert page.is_visible("#edit-inputs") and page.get_attribute("#size", "placeholder") == "the first image's"
    page.fill("#prompt", "make it blue")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    for name, data in picked.items():
        page.set_input_files("#images", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
    drop_files(page, "#drop-zone", dropped)
    assert page.locator("#image-list li span").all_inner_texts() == [*picked, *dropped]
    if mask is not None:
        page.set_input_files("#mask", files=[{"name": "mask.png", "mimeType": "image/png", "buffer": mask}])
    page.click("#run")
    page.wait_for_selector("#final-image[src]")
    assert page.locator("#event-log li").all_inner_texts()[-1] == "final image"
    assert problems == []
    return page


def edit_directly(url, images: list[bytes], mask: bytes | None):
    files = [("image[]", (f"{index}.png", data, "image/png")) for index, data in enumerate(images)]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    fields = {"prompt": "make it blue", "num_inference_steps": "2", "seed": "3"}
    response = httpx.post(f"{url}/v1/images/edits", data=fields, files=files, timeout=120)
    assert response.status_code == 200, response.text
    return np.asarray(decode_b64_image(response.json()["data"][0]["b64_json"]).convert("RGB"), dtype=np.float64)


RED, GREEN = (png_bytes(Image.new("RGB", (40, 48), colour)) for colour in ("red", "green"))


def test_the_page_edits_several_picked_and_dropped_images(browser, tiny_edit_plus, small_edits, artifacts):
    with RunningServer(build_app(AsyncEngine(str(tiny_edit_plus), cache_backend="tea_cache"))) as server:
        page = edit_in_page(browser, server.url, {"red.png": RED}, {"green.png": GREEN}, mask=None)
        # the page sent both images, in order: the server makes the same image from them
        assert np.array_equal(image_of(page, "#final-image"), edit_directly(server.url, [RED, GREEN], None))
        assert not np.array_equal(image_of(page, "#final-image"), edit_directly(server.url, [RED], None))
        page.screenshot(path=str(artifacts / "edit.png"), full_page=True)
        page.close()


def test_the_page_sends_the_mask_of_an_edit(browser, tiny_edit, small_edits):
    mask_image = Image.new("RGBA", (40, 48), (0, 0, 0, 255))
    mask_image.paste((0, 0, 0, 0), (0, 0, 20, 48))  # the transparent left half is repainted
    mask = png_bytes(mask_image)
    with RunningServer(build_app(AsyncEngine(str(tiny_edit), cache_backend="tea_cache"))) as server:
        page = edit_in_page(browser, server.url, {"red.png": RED}, {}, mask=mask)
        assert np.array_equal(image_of(page, "#final-image"), edit_directly(server.url, [RED], mask))
        assert not np.array_equal(image_of(page, "#final-image"), edit_directly(server.url, [RED], None))
        page.close()
