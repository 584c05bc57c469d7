import http.server
import os
import sys
import threading
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` runs N workers on the same cores: each gets its share of math threads (and so does every
    # process it starts) instead of all of them oversubscribing every core.
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

from tests.helpers import FakeHub, make_tiny_model_dir

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
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_hub():
    FakeHub.requests, FakeHub.files, FakeHub.auth, FakeHub.created = [], {}, set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
