"""Every shipped accelerate config: parsed by accelerate's own launcher code, headed by its launch command, and
(DeepSpeed) accepted by DeepSpeed's own config class once transformers has filled its "auto" values."""

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from llmft.config import TrainingConfig
from tests.helpers import REPO

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
EXPECTED = {"single_device", "multi_gpu", "cpu_ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload",
            "fsdp2", "fsdp2_qlora", "multi_node"}


def test_every_launch_mode_ships():
    assert {p.stem for p in CONFIGS} == EXPECTED
    assert (REPO / "accelerate_configs" / "slurm_multi_node.sh").read_text().startswith("#!/bin/bash\n# sbatch ")


def _launch_args(path):
    """What `accelerate launch --config_file PATH -m llmft train R` resolves, through accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "llmft", "train", "R"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_names_its_command(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file accelerate_configs/{path.name} -m llmft train RECIPE")
    args = _launch_args(path)
    assert args.num_processes == config.num_processes and args.num_machines == config.num_machines


def test_cpu_ddp_config_goes_through_torchrun():
    """accelerate's --cpu route starts one process; only the MULTI_GPU route spawns num_processes (torchrun)."""
    config = load_config_from_file(str(REPO / "accelerate_configs" / "cpu_ddp.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 2
    assert not config.use_cpu


@pytest.mark.parametrize("name,stage,offload", [("deepspeed_zero2", 2, "none"), ("deepspeed_zero3", 3, "none"),
                                                ("deepspeed_zero3_offload", 3, "cpu")])
def test_deepspeed_configs_pass_deepspeeds_own_validation(name, stage, offload, tmp_path):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    settings = yaml.safe_load((REPO / "accelerate_configs" / f"{name}.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(**settings)  # what accelerate builds from the file at launch
    filled = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    filled.trainer_config_process(TrainingConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=4))
    config = DeepSpeedConfig(filled.config)
    assert config.zero_optimization_stage == stage
    assert config.train_micro_batch_size_per_gpu == 2 and config.gradient_accumulation_steps == 4
    assert config.zero_config.offload_optimizer.device == offload
    if stage == 3:  # the gathered full weights are saved, not only the shards
        assert config.zero_config.gather_16bit_weights_on_model_save


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_qlora"])
def test_fsdp_configs_build_an_fsdp2_full_shard_plugin_that_saves_full_state_dicts(name, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(_launch_args(REPO / "accelerate_configs" / f"{name}.yaml"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as in the training processes
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading
