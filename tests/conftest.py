import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The embedded default model is built into a cache folder: keep it inside the test run."""
    os.environ["TEASERVE_CACHE"] = str(tmp_path_factory.mktemp("teaserve-cache"))
    from teaserve.cli.main import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from teaserve.pipelines.testing import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen"))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)
