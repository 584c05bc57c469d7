"""The command line: light commands stay light, options parse from their dataclasses, old spellings still work."""

import logging
import os
import subprocess
import sys

import pytest

from llmft.cli import COMMANDS
from llmft.config import STAGES as STAGE_NAMES
from llmft.evaluation import OPTIONS, RENAMED
from llmft.parsing import parse
from llmft.stages import STAGES
from tests.helpers import write_jsonl


def test_light_commands_import_neither_torch_nor_trl(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"task {i}", "output": "done"} for i in range(3)])
    script = f"""
import sys
from llmft.cli import run
try:
    run(["data", "convert", "--help"])
except SystemExit:
    pass
code = run(["data", "convert", {str(data)!r}, "--out", {str(tmp_path / "out")!r}, "--near-dedupe", "off"])
print(code, sorted(m for m in ("torch", "trl", "transformers.modeling_utils") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr[-2000:]
    assert (tmp_path / "out" / "train" / "state.json").exists()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    argv = ["convert", "--help"] if name == "data" else ["--help"]
    try:
        COMMANDS[name](argv)()
    except SystemExit as stop:  # argparse's help exits 0
        assert stop.code == 0
    assert "--" in capsys.readouterr().out


def test_deprecated_eval_flags_still_work_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="llmft"):
        options, settings, _ = parse(OPTIONS, ["some/model", "--batch-size", "4", "--lm-eval-no-chat-template"],
                                  "llmft eval", renamed=RENAMED)
    assert settings.generate_batch_size == 4 and options.lm_eval_chat_template is False
    assert "--batch-size is deprecated; use --generate_batch_size" in caplog.text


def test_unknown_flags_name_the_closest_one():
    from llmft.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown option '--num_generat'. Did you mean '--num_generate'?"):
        parse(OPTIONS, ["m", "--num_generat", "3"], "llmft eval")


def test_every_stage_in_the_table_is_a_recipe_stage_with_its_training_section():
    from llmft.config import TRAINING_CLASSES

    assert set(STAGES) == set(STAGE_NAMES) == set(TRAINING_CLASSES)
    for stage in STAGES.values():
        assert stage.trainer_class().__name__.endswith("Trainer")


def test_a_rank_of_a_launch_exits_with_its_code_after_the_exit_handlers_and_skips_the_teardown(tmp_path):
    """DDP keeps gloo's process group and its threads alive to the end, and the interpreter's teardown can abort a
    rank that finished (llmft.train.exit_rank). A rank leaves with its command's exit code, after the exit handlers
    and with its output flushed, but without the teardown (the witness object is never finalised)."""
    script = f"""
import atexit, sys
class Witness:
    def __del__(self):
        print("teardown ran")
witness = Witness()
atexit.register(lambda: print("exit handler ran"))
print("buffered output", end=" ")
sys.argv = ["llmft", "train", {str(tmp_path / "missing.yaml")!r}]
from llmft.cli import main
main()
"""
    env = {**os.environ, "WORLD_SIZE": "2", "LLMFT_ALLOCATOR": "system"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "missing.yaml" in done.stderr
    assert done.stdout.split() == ["buffered", "output", "exit", "handler", "ran"], done.stdout


def test_only_refused_paths_become_one_line_messages():
    """A path of the wrong kind, without permission or on a full disk is the user's to fix: one line naming it. Any
    other OSError may be a bug and keeps its traceback."""
    import errno

    from llmft.cli import _path_hint

    assert "a folder goes" in _path_hint(NotADirectoryError(errno.ENOTDIR, "Not a directory", "out/train"))
    assert "permissions" in _path_hint(PermissionError(errno.EACCES, "Permission denied", "/root/x"))
    assert "space" in _path_hint(OSError(errno.ENOSPC, "No space left on device", "runs/x"))
    assert _path_hint(FileNotFoundError(errno.ENOENT, "No such file", "llmft/resources/x")) is None
    assert _path_hint(OSError(errno.EIO, "I/O error")) is None
