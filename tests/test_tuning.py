"""Fine-tuning strategies, each shown to act as described on a small random model: freezing, gradual unfreezing,
layer-wise learning rates, L2-SP, dropout, NEFTune, warmup schedules, training from scratch."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llmft.config import ModelConfig, PeftSettings, load_recipe
from llmft.errors import ConfigError, LaunchError, ModelError
from llmft.model import load_model
from llmft.run_dir import read_run
from llmft.train import train
from tests.helpers import chat_rows, make_tiny_model_dir, write_jsonl, write_recipe

FULL = {"method": "full"}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """Four blocks, so there is a bottom, a top and something between."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("deep"), layers=4)


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", chat_rows(10))


def _weights(path):
    return load_file(path / "model.safetensors")


def _recipe(tmp_path, model_dir, train_file, argv=(), **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", model_dir, train_file, out, **sections)
    return load_recipe(path, list(argv)), out


class StepWeights(TrainerCallback):
    """The first optimizer step after which each block's weights differ from the start, and the optimizer."""

    def __init__(self):
        self.start, self.first_change, self.optimizer, self.rates = {}, {}, None, {}

    @staticmethod
    def _blocks(model):
        return {i: layer.mlp.down_proj.weight.detach().clone() for i, layer in enumerate(model.model.layers)}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = self._blocks(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        for i, weight in self._blocks(model).items():
            if i not in self.first_change and not torch.equal(weight, self.start[i]):
                self.first_change[i] = state.global_step
        self.optimizer, self.model = optimizer, model
        self.rates = self.rates or {g["name"]: g["lr"] for g in optimizer.param_groups}  # after the first step


def test_freezing_keeps_embeddings_bottom_blocks_and_patterns_unchanged(tmp_path, deep_model, train_file):
    recipe, out = _recipe(tmp_path, deep_model, train_file, peft=FULL,
                          tuning={"freeze_embeddings": True, "freeze_layers": 2, "freeze_patterns": ["post_attention"]})
    train(recipe)
    before, after = _weights(deep_model), _weights(out)
    frozen = [k for k in before if "embed_tokens" in k or ".layers.0." in k or ".layers.1." in k or "post_attention" in k]
    trained = [k for k in before if k not in frozen]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)
    run = read_run(out).info
    assert run.frozen == ["embeddings (tied to the output head, so the head too)", "blocks 0-1",
                             "'post_attention' (4 tensors)"]
    assert run.trainable_parameters == sum(after[k].numel() for k in trained)
    assert run.trainable_tensors["changed"] == run.trainable_tensors["total"] == len(trained)


def test_freezing_rules_that_match_nothing_or_everything_are_errors(tmp_path, deep_model, train_file):
    recipe, _ = _recipe(tmp_path, deep_model, train_file, peft=FULL, tuning={"freeze_patterns": ["no_such_module"]})
    with pytest.raises(ConfigError, match="'no_such_module' matches no parameter. Names look like: model.embed_tokens"):
        train(recipe)
    recipe, _ = _recipe(tmp_path, deep_model, train_file, peft=FULL, tuning={"freeze_layers": 4})
    with pytest.raises(ConfigError, match="would freeze all 4 blocks; use at most 3"):
        train(recipe)
    with pytest.raises(ConfigError, match="not a regular expression"):
        _recipe(tmp_path, deep_model, train_file, tuning={"freeze_patterns": ["(unclosed"]})


def test_gradual_unfreezing_adds_blocks_top_down_and_the_optimizer_picks_them_up(tmp_path, deep_model, train_file):
    """Block 3 (top) trains from step 1; one more block every 2 steps: block 2 at step 3, 1 at 5, 0 at 7."""
    recipe, out = _recipe(tmp_path, deep_model, train_file, ["--max_steps", "8", "--weight_decay", "0.1"], peft=FULL,
                          tuning={"unfreeze_every": 2, "unfreeze_initial_layers": 1})
    probe = StepWeights()
    train(recipe, callbacks=[probe])
    assert probe.first_change == {3: 1, 2: 3, 1: 5, 0: 7}
    # AdamW counts each parameter's own steps: a block unfrozen at step 7 of 8 has taken exactly 2, and weight
    # decay did not touch it while it was frozen (checked above: it did not change before step 7).
    steps = {i: float(probe.optimizer.state[layer.mlp.down_proj.weight]["step"])
             for i, layer in enumerate(probe.model.model.layers)}
    assert steps == {0: 2.0, 1: 4.0, 2: 6.0, 3: 8.0}
    run = read_run(out).info
    assert run.trainable_tensors["changed"] == run.trainable_tensors["total"]
    groups = run.param_groups  # one rate (no layer_lr_decay), groups per unit all the same
    assert {g["unit"] for g in groups} == {"embeddings (tied head)", "head", "block 0", "block 1", "block 2", "block 3"}
    assert {g["lr"] for g in groups} == {1e-2}


def test_unfreezing_every_half_epoch_unfreezes_a_stage_at_each_half(deep_model):
    from transformers import TrainerState

    from llmft.config import TuningConfig
    from llmft.tuning import GradualUnfreezing

    model = load_model(ModelConfig(name_or_path=str(deep_model), dtype="float32"), PeftSettings(method="full"))
    schedule = GradualUnfreezing(model, TuningConfig(unfreeze_every=0.5, unfreeze_by="epochs"))
    assert [schedule._target(TrainerState(epoch=e)) for e in (0.0, 0.4, 0.5, 1.0, 1.5, 9.0)] == [1, 1, 2, 3, 4, 4]
    tenths = GradualUnfreezing(model, TuningConfig(unfreeze_every=0.1, unfreeze_by="epochs"))
    assert tenths._target(TrainerState(epoch=0.3)) == 4  # 0.3 // 0.1 is 2.0 in floating point


def test_tuning_settings_must_be_finite():
    from llmft.config import TuningConfig

    for setting in ("unfreeze_every", "head_lr_multiplier", "l2sp_alpha", "layer_lr_decay"):
        with pytest.raises(ConfigError, match=f"tuning.{setting}: nan is not a finite number"):
            TuningConfig(**{setting: math.nan})


def test_gradual_unfreezing_is_refused_with_several_processes(tmp_path, deep_model, train_file):
    from llmft.tuning import check_launch

    recipe, _ = _recipe(tmp_path, deep_model, train_file, peft=FULL, tuning={"unfreeze_every": 2})

    class Accelerator:  # only the attribute check_launch reads; a real 2-process launch is in test_distributed
        from accelerate import DistributedType
        distributed_type = DistributedType.MULTI_CPU

    with pytest.raises(LaunchError, match="one process only"):
        check_launch(recipe.tuning, 2, Accelerator())


def test_layer_wise_learning_rates_per_block_and_head(tmp_path, deep_model, train_file):
    lr = 1e-2
    recipe, out = _recipe(tmp_path, deep_model, train_file, peft=FULL,
                          tuning={"layer_lr_decay": 0.5, "head_lr_multiplier": 2.0})
    probe = StepWeights()
    train(recipe, callbacks=[probe])
    groups = {g["unit"]: g["lr"] for g in read_run(out).info.param_groups}
    assert groups == pytest.approx({"embeddings (tied head)": 2 * lr, "head": 2 * lr, "block 3": lr,
                                    "block 2": lr / 2, "block 1": lr / 4, "block 0": lr / 8})
    # The scheduler scales every group alike, so the ratios hold at every step.
    assert 0 < probe.rates["block 3"] < lr
    assert probe.rates["block 0"] / probe.rates["block 3"] == pytest.approx(1 / 8)


def test_layer_wise_rates_with_an_8_bit_optimizer_keep_embedding_states_in_32_bits(tmp_path, deep_model, train_file):
    """As the Trainer does for its own optimizer: 8-bit Adam states destabilise embeddings."""
    recipe, _ = _recipe(tmp_path, deep_model, train_file, ["--optim", "adamw_bnb_8bit", "--max_steps", "1"],
                        peft=FULL, tuning={"layer_lr_decay": 0.9})
    probe = StepWeights()
    train(recipe, callbacks=[probe])
    optimizer = getattr(probe.optimizer, "optimizer", probe.optimizer)
    embedding = optimizer.state[probe.model.get_input_embeddings().weight]  # 8-bit by size (12,800 > 4,096 values)
    assert embedding["state1"].dtype == torch.float32


def test_an_optimizer_that_cannot_load_is_a_config_error(tmp_path, deep_model, train_file):
    """GaLore and LOMO live in packages of their own, which a run without them names (was a traceback)."""
    for tuning in ({}, {"layer_lr_decay": 0.9}):
        recipe, _ = _recipe(tmp_path / str(len(tuning)), deep_model, train_file, ["--optim", "lomo"], peft=FULL,
                            tuning=tuning)
        with pytest.raises(ConfigError, match="training.optim: lomo: You need to install `lomo_optim`"):
            train(recipe)


def test_tuning_groups_are_refused_for_an_optimizer_that_builds_its_own():
    """transformers hands GaLore/APOLLO/LOMO their parameters itself (params, model or optimizer_dict)."""
    from llmft.tuning import _builds_own_groups

    assert _builds_own_groups(torch.optim.AdamW, {"optimizer_dict": {}})
    assert _builds_own_groups(torch.optim.AdamW, {"params": [], "lr": 1e-3})
    assert not _builds_own_groups(torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999)})


def test_layer_wise_learning_rates_apply_to_lora_adapters_by_block(tmp_path, deep_model, train_file):
    recipe, out = _recipe(tmp_path, deep_model, train_file, tuning={"layer_lr_decay": 0.5})
    train(recipe)
    groups = read_run(out).info.param_groups
    assert {g["unit"] for g in groups} == {"block 0", "block 1", "block 2", "block 3"}
    assert sum(g["tensors"] for g in groups) == 4 * 7 * 2  # 7 linear layers per block, lora_A and lora_B


def test_l2sp_keeps_full_fine_tuning_closer_to_the_pretrained_weights(tmp_path, deep_model, train_file):
    distances = {}
    for alpha in (0.0, 3.0):
        recipe, out = _recipe(tmp_path / str(alpha), deep_model, train_file, ["--max_steps", "6"], peft=FULL,
                              tuning={"l2sp_alpha": alpha})
        train(recipe)
        before, after = _weights(deep_model), _weights(out)
        distances[alpha] = math.sqrt(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in before))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        logged = [h["l2sp_distance"] for h in history if "l2sp_distance" in h]
        assert (len(logged) == 6) == bool(alpha)
        if alpha:
            assert logged[-1] == pytest.approx(distances[alpha], rel=1e-3)
    assert distances[3.0] < 0.7 * distances[0.0], distances


def test_l2sp_needs_full_fine_tuning_from_pretrained_weights(tmp_path, deep_model, train_file):
    with pytest.raises(ConfigError, match="l2sp_alpha pulls trained weights toward their pretrained values"):
        _recipe(tmp_path, deep_model, train_file, tuning={"l2sp_alpha": 0.1})


def test_attention_dropout_is_set_and_active_only_in_training(deep_model):
    model = load_model(ModelConfig(name_or_path=str(deep_model), attention_dropout=0.5), PeftSettings(method="full"))
    assert model.config.attention_dropout == 0.5
    ids = torch.arange(3, 20)[None]
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_dropout_the_architecture_lacks_is_a_clear_error(deep_model):
    with pytest.raises(ModelError, match="llama models have no such setting .*attention_dropout.*lora_dropout"):
        load_model(ModelConfig(name_or_path=str(deep_model), hidden_dropout=0.1), PeftSettings(method="full"))


class EmbeddingNoise(TrainerCallback):
    """How far the embedding output moves from the embedding table, in training mode, during and after training."""

    def __init__(self):
        self.during, self.after = None, None

    @staticmethod
    def _noise(model):
        embed = model.get_input_embeddings()
        ids = torch.arange(3, 13)[None]
        with torch.no_grad():
            return (embed(ids) - embed.weight[ids]).abs().max().item()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.during = self._noise(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def test_neftune_adds_bounded_noise_to_embeddings_only_while_training(tmp_path, deep_model, train_file):
    alpha = 5.0
    recipe, _ = _recipe(tmp_path, deep_model, train_file, ["--neftune_noise_alpha", str(alpha)], peft=FULL)
    probe = EmbeddingNoise()
    train(recipe, callbacks=[probe])
    bound = alpha / math.sqrt(10 * 32)  # alpha / sqrt(sequence length x hidden size), the NEFTune paper's scale
    assert 0.5 * bound < probe.during <= bound
    probe.model.train()
    assert EmbeddingNoise._noise(probe.model) == 0.0  # the hook is gone after training


def test_warmup_then_cosine_schedule(tmp_path, deep_model, train_file):
    recipe, out = _recipe(tmp_path, deep_model, train_file, ["--max_steps", "8", "--warmup_steps", "3",
                                                             "--lr_scheduler_type", "cosine"])
    train(recipe)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = [h["learning_rate"] for h in history if "learning_rate" in h]
    # The rate logged for a step is the one it used: 0, 1/3 and 2/3 of the peak in the 3 warmup steps, then the peak.
    peak = rates.index(max(rates))
    assert rates[:4] == pytest.approx([0, 1e-2 / 3, 2e-2 / 3, 1e-2]) and peak == 3
    assert all(a < b for a, b in zip(rates[:peak], rates[1 : peak + 1]))
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1 :])) and rates[-1] < 0.1 * max(rates)


def test_scratch_init_builds_the_same_architecture_with_fresh_seeded_weights(deep_model):
    from transformers import set_seed

    pretrained = load_model(ModelConfig(name_or_path=str(deep_model)), PeftSettings(method="full")).state_dict()
    fresh = {}
    for scheme in ("model", "model", "xavier", "he"):
        set_seed(7)
        model = load_model(ModelConfig(name_or_path=str(deep_model), init="scratch", init_linear=scheme),
                           PeftSettings(method="full"))
        fresh.setdefault(scheme, []).append(model.state_dict())
    first = fresh["model"][0]
    assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in pretrained.items()}
    assert all(not torch.equal(first[k], pretrained[k]) for k in first if "norm" not in k)  # norms start at 1
    assert all(torch.equal(first[k], fresh["model"][1][k]) for k in first)  # the seed decides
    down = "model.layers.0.mlp.down_proj.weight"  # fan_in 64, fan_out 32
    assert fresh["xavier"][0][down].std().item() == pytest.approx(math.sqrt(2 / 96), rel=0.15)
    assert fresh["he"][0][down].std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.15)
    assert first[down].std().item() == pytest.approx(0.02, rel=0.15)  # Llama's own initializer_range
    # The tied output layer keeps the embeddings' initialisation under every scheme.
    assert torch.equal(fresh["he"][0]["model.embed_tokens.weight"], fresh["model"][0]["model.embed_tokens.weight"])


def test_training_from_scratch_writes_a_full_run(tmp_path, deep_model, train_file):
    recipe, out = _recipe(tmp_path, deep_model, train_file, ["--learning_rate", "1e-3"], peft=FULL,
                          model={"init": "scratch"})
    train(recipe)
    run = read_run(out)
    assert run.info.base_model.init == "scratch"
    assert run.info.trainable_tensors["changed"] == run.info.trainable_tensors["total"]
    assert run.metrics.before["eval_loss"] > 5.5  # ~ln(vocabulary): it knows nothing yet
    from llmft.hub import model_card

    card = model_card(out, "org/scratch")
    assert "trained from scratch (random initial weights)" in card and "base_model:" not in card


def test_scratch_with_adapters_is_refused(tmp_path, deep_model, train_file):
    with pytest.raises(ConfigError, match="init: scratch trains every weight .* Set peft.method: full"):
        _recipe(tmp_path, deep_model, train_file, model={"init": "scratch"})


def test_gradual_unfreezing_with_nothing_to_train_at_first_is_an_error(tmp_path, deep_model, train_file):
    recipe, _ = _recipe(tmp_path, deep_model, train_file, tuning={"unfreeze_every": 2, "unfreeze_initial_layers": 0})
    with pytest.raises(ConfigError, match="0 leaves nothing to train before the first stage"):
        train(recipe)  # LoRA: the adapters are all in blocks
