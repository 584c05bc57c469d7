"""Every shipped accelerate config parses with accelerate's own loader and is headed by its launch command."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from tests.helpers import REPO

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


def test_configs_ship():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_names_its_command(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    first = path.read_text().splitlines()[0]
    assert first == f"# accelerate launch --config_file accelerate_configs/{path.name} -m llmft train RECIPE"


def test_cpu_ddp_config_goes_through_torchrun():
    """accelerate's --cpu route starts one process; only the MULTI_GPU route spawns num_processes (torchrun)."""
    config = load_config_from_file(str(REPO / "accelerate_configs" / "cpu_ddp.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 2
    assert not config.use_cpu
