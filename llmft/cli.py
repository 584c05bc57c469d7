"""`llmft COMMAND ...`: parse, dispatch, and turn known errors into clear messages (no tracebacks)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

USAGE = """usage: llmft COMMAND [ARGS]

Fine-tune open LLMs on your own chat data.

commands:
  train RECIPE [--key value ...]   supervised fine-tuning (full or LoRA) from a recipe YAML to a run directory;
                                   any recipe key can be overridden: --learning_rate 1e-4 or --training.max_steps 50
                                   multi-process: accelerate launch --config_file accelerate_configs/X.yaml -m llmft train RECIPE

`llmft COMMAND --help` lists a command's options.
"""


def _setup_logging() -> None:
    """Log once per process group: rank 0 at INFO, the others at WARNING."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("llmft").setLevel(level)
    # bitsandbytes announces a missing optional kernel package on import; it changes nothing here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # TRL 1.16 still calls transformers' old checkpointing name internally; users cannot act on it.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def _train(argv: list[str]) -> int:
    from llmft.config import ConfigError, cli_help, load_recipe

    if not argv or argv[0] in ("-h", "--help"):
        print(cli_help())
        return 0
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except ConfigError as err:
        print(f"llmft train: {err}", file=sys.stderr)
        return 2
    from llmft.data import DataError
    from llmft.model import ModelError
    from llmft.run_dir import RunDirError
    from llmft.train import LaunchError, train

    try:
        train(recipe)
    except (DataError, ModelError, RunDirError, LaunchError) as err:
        print(f"llmft train: {err}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"llmft: unknown command '{argv[0]}'.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    _setup_logging()
    sys.exit(command(argv[1:]))
