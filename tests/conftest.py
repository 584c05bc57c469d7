import os
import sys
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model_dir

# The tests drive the `llmft` console script of the interpreter running them.
LLMFT = str(Path(sys.executable).parent / "llmft")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def quiet_env():
    """Environment for subprocesses: no tokenizers fork warnings, no Hub calls."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
