"""The `teaserve` command line on the embedded default model."""

import subprocess
import sys

from PIL import Image


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "teaserve", *args], capture_output=True, text=True, timeout=300)


def test_generate_on_the_default_model_writes_a_png(tmp_path):
    out = tmp_path / "cat.png"
    result = run_cli("generate", "a cat sitting on a windowsill", "-o", str(out), "--seed", "0", "--steps", "4")
    assert result.returncode == 0, result.stderr
    assert f"saved {out}" in result.stdout and "4 steps in" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)


def test_generate_with_bad_input_prints_one_clear_line(tmp_path):
    result = run_cli("generate", "a cat", "--size", "30x30", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("teaserve generate: error: width must be")
