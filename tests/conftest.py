import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _quiet_libraries():
    from teaserve.cli.main import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen"))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class RunningServer:
    """A real uvicorn server on 127.0.0.1 in a background thread, set up as `teaserve serve` sets it up.

    Signals only reach the main thread: `server.handle_exit(signal.SIGTERM, None)` stands for one.
    """

    def __init__(self, app, **settings):
        import threading

        from teaserve.server.runner import build_server

        self.app = app
        self.server = build_server(app, host="127.0.0.1", port=0, log_level="warning", **settings)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs
        )


def wait_until(condition, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metric(server, name: str, **labels) -> float:
    """The value of one series on the server's /metrics (0 when absent)."""
    import httpx

    text = httpx.get(f"{server.url}/metrics").text
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="session")
def tiny_edit_plus(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("tiny-edit-plus"), kind="edit_plus")


@pytest.fixture(scope="session")
def tiny_edit(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("tiny-edit"), kind="edit")


@pytest.fixture(scope="session")
def tiny_layered(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("tiny-layered"), kind="layered")


@pytest.fixture(scope="module")
def small_edits():
    """Small condition images for the modules that ask for it; the others see diffusers' own sizing."""
    from teaserve.pipelines.testing import small_edit_condition_images

    with small_edit_condition_images():
        yield


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_b64_image(data: str):
    import base64
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-kontext"), kind="kontext")


SERVE_WITH_HELD_STEPS = """
import os, sys, time, torch
from teaserve.cli.main import main

hold = sys.argv[1]

def hold_the_transformer(module, args):
    if type(module).__name__.endswith(("Transformer2DModel", "Transformer3DModel")):
        while os.path.exists(hold):
            time.sleep(0.01)

torch.nn.modules.module.register_module_forward_pre_hook(hold_the_transformer)
sys.exit(main(["serve", *sys.argv[2:]]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HeldServer:
    """`teaserve serve MODEL FLAGS` in a subprocess on a free port: the CLI's own `main` with one addition, a global
    forward pre-hook that holds every transformer call while the file `hold` exists, so that "a generation is
    running" lasts exactly as long as a test needs. `held`: whether the file exists from the start."""

    def __init__(self, model, folder, *flags, held=True):
        import subprocess
        import sys

        port, self.hold, self.log = free_port(), folder / "hold", folder / "serve.log"
        if held:
            self.hold.touch()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", SERVE_WITH_HELD_STEPS, str(self.hold), str(model), *flags]
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self):
        import contextlib

        import httpx

        def ready():
            assert self.process.poll() is None, self.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{self.url}/ready").status_code == 200
            return False

        wait_until(ready, timeout=180)
        return self

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def stop(self):
        self.hold.unlink(missing_ok=True)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
