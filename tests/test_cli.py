"""The `teaserve` command line on the embedded default model."""

import signal
import subprocess
import sys

from PIL import Image

from teaserve.pipelines.default_model import shapes


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "teaserve", *args], capture_output=True, text=True, timeout=300)


def test_generate_on_the_default_model_writes_a_png(tmp_path):
    out = tmp_path / "cat.png"
    result = run_cli("generate", "a cat sitting on a windowsill", "-o", str(out), "--seed", "0", "--steps", "4")
    assert result.returncode == 0, result.stderr
    assert f"saved {out}" in result.stdout and "4 steps in" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_generate_with_bad_input_prints_one_clear_line(tmp_path):
    result = run_cli("generate", "a cat", "--size", "30x30", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "teaserve generate: error: width and height must each be a multiple of 8 for this model, got 30x30"
    )


def test_calibrate_with_too_few_prompts_says_how_many_it_needs(tiny_qwen):
    result = run_cli("calibrate", str(tiny_qwen), "--num-prompts", "16", "--validate", "8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "teaserve calibrate: error: 16 calibration prompts and 8 validation prompts need 24 prompts, there are 8: "
        "give more with --prompts FILE (one per line)"
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_block(marker: str) -> str:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = readme.split("```bash\n")[1:]
    return next(block.split("```")[0] for block in blocks if marker in block)


def test_serve_then_the_readme_curl_example(tmp_path):
    import os
    import time

    import httpx

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teaserve",
            "serve",
            "--omni",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--cache-backend",
            "tea_cache",
            "--cache-config",
            '{"rel_l1_thresh": 0.2}',
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        curl = readme_block("curl -s http://localhost:8091").replace("localhost:8091", f"127.0.0.1:{port}")
        result = subprocess.run(
            ["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ}
        )
        assert result.returncode == 0, result.stderr
        with Image.open(tmp_path / "out.png") as image:
            assert image.format == "PNG"
            # the embedded model draws what the README's prompt asks
            assert shapes.check(image, "a small red circle at the top left on a blue background").passed_all
        assert "teaserve_images_generated_total 1.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        output = server.communicate(timeout=30)[0]
    # uvicorn shuts down gracefully, then re-raises the signal so that the exit status tells why the server ended
    assert server.returncode in (0, -signal.SIGINT, 128 + signal.SIGINT)
    assert "Traceback" not in output


def test_serve_refuses_bad_cache_config_in_one_line():
    for config, message in (('{"rel_l1_thresh": ', "not valid JSON"), ('{"thresh": 0.2}', "valid keys: rel_l1_thresh")):
        result = run_cli("serve", "--cache-backend", "tea_cache", "--cache-config", config)
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert message in last, result.stderr


def test_generate_on_a_video_model_writes_an_mp4_of_the_asked_frames(tmp_path):
    from teaserve.engine import decode_mp4
    from teaserve.pipelines.testing import build_tiny_wan

    model = build_tiny_wan(tmp_path / "wan")
    out = tmp_path / "clip.mp4"
    result = run_cli("generate", str(model), "a red ball", "-o", str(out), "--num-frames", "5", "--fps", "4")
    assert result.returncode == 0, result.stderr
    assert f"saved {out} (16x16, 5 frames at 4 fps)" in result.stdout
    frames, fps = decode_mp4(out.read_bytes())
    assert (len(frames), frames[0].size, fps) == (5, (16, 16), 4)

    result = run_cli("generate", str(model), "a red ball", "-o", str(tmp_path / "clip.png"))
    assert result.returncode == 2
    assert "this model makes videos: -o must end in .mp4, .gif, .webp" in result.stderr
    result = run_cli("generate", str(model), "a red ball", "--num-frames", "6", "-o", str(out))
    assert result.returncode == 2
    assert "num_frames must be 1" in result.stderr.strip().splitlines()[-1]


def test_serve_ray_without_ray_installed_names_the_extra(monkeypatch, capsys):
    from teaserve.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(["serve", "--ray", "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "teaserve serve: error: --ray needs Ray Serve, an optional extra of teaserve: pip install 'teaserve[ray]'"
    )
    assert main(["serve", "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "teaserve serve: error: --replicas needs --ray"


def test_serve_config_args_are_the_serve_flags_read_as_on_the_command_line():
    import pytest

    from teaserve.scale.settings import ScaleSettings

    settings = ScaleSettings.from_options(
        {
            "model": "org/model",
            "max_replicas": "4",  # `serve run ... max_replicas=4` gives text
            "cache_config": '{"rel_l1_thresh": 0.3}',
            "request_timeout": "0",
            "max_queue_size": 4,  # a config file gives typed values
            "replica_gpus": 0.5,
            "playground": "false",
        }
    )
    assert settings.autoscaling and (settings.min_replicas, settings.max_replicas) == (None, 4)
    assert settings.engine.model == "org/model" and settings.engine.cache_config == {"rel_l1_thresh": 0.3}
    assert settings.engine.request_timeout is None and settings.engine.max_queue_size == 4
    assert settings.replica_gpus == 0.5 and settings.torch_threads == 1 and settings.playground is False
    assert ScaleSettings.from_options({"playground": True}).playground is True
    with pytest.raises(ValueError, match=r"playground \(--playground\): must be true or false, got 'off'"):
        ScaleSettings.from_options({"playground": "off"})
    with pytest.raises(ValueError, match=r"playground \(--playground\) must be true or false, got 1"):
        ScaleSettings.from_options({"playground": 1})
    with pytest.raises(ValueError, match=r"unknown teaserve setting 'replica'; valid settings: api_key, "):
        ScaleSettings.from_options({"replica": 2})
    with pytest.raises(ValueError, match=r"min_replicas <= replicas <= max_replicas, got 1 <= 5 <= 4"):
        ScaleSettings.from_options({"replicas": 5, "max_replicas": 4})
    with pytest.raises(ValueError, match=r"autoscaling needs max_replicas \(--max-replicas\) too"):
        ScaleSettings.from_options({"min_replicas": 2})
    with pytest.raises(ValueError, match=r"max_queue_size \(--max-queue-size\): invalid literal"):
        ScaleSettings.from_options({"max_queue_size": "many"})
