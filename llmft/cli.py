"""`llmft COMMAND ...`: parse the command's options and dispatch to the module that does the work.

Every command's options are dataclasses declared beside the code that uses them, parsed by `llmft.parsing`. Any
`LlmftError` becomes its message on stderr and the command's exit code, never a traceback. Modules are imported
only for the command that runs, so light commands (`llmft data convert`) never import torch or TRL.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable

from llmft.errors import LlmftError, Preempted
from llmft.hardware import preload_allocator
from llmft.parsing import parse

USAGE = """usage: llmft COMMAND [ARGS]

Fine-tune open LLMs on your own chat data.

commands:
  train RECIPE [--key value ...]   fine-tune from a recipe YAML to a run directory; any recipe key can be
                                   overridden: --learning_rate 1e-4 or --training.max_steps 50
                                   multi-process: accelerate launch --config_file accelerate_configs/X.yaml -m llmft train RECIPE
  compare RECIPE... --sizes N... --out DIR
                                   train each recipe (e.g. fine-tune vs model.init: scratch) at each data size on one
                                   token budget; report.md + eval loss vs tokens plot

  data convert SOURCE... --out DIR convert Alpaca/ShareGPT/OpenAI/OASST/prompt-completion/column data into one chat
                                   dataset: validate, normalise, dedupe, decontaminate, split; manifest + data card
  data build BUILD.yaml            the same from a YAML file (several sources, weighted mixes)
  data report DATASET --recipe R   pre-flight report: lengths, truncation, loss share, a rendered loss mask
  selfchat --seeds FILE --out DIR  Baize-style self-chat: one model writes both sides of dialogues about seed
                                   questions (local model or OpenAI-compatible server); resumable
  selfchat feedback --prompts P --judge-model J --out DIR
                                   Baize v2 self-distillation: sample N answers a prompt, a judge grades them;
                                   best answers (sft/) and best vs worst pairs (dpo/); resumable
  augment DATA --out FILE          more rows by paraphrasing or back-translating user turns (same backends)

  eval RUN_DIR|MODEL [--baseline B] held-out loss, generation metrics and general-text perplexity; with a baseline,
                                   side by side with deltas; writes eval_results.json and eval_report.md
  estimate RECIPE [--gpus N] [--gpu-memory 80GB]
                                   before launch: memory per device (weights, gradients, optimizer, activations),
                                   fits or what to change, time per epoch
  report RUN_DIR [RUN_DIR ...]     one self-contained HTML page: curves, before/after metrics, samples, data, speed,
                                   recipe; several runs side by side with their recipe differences
  export RUN_DIR --format gguf [--quant q8_0]
                                   a GGUF file for llama.cpp (llama.cpp's converter and quantizer) and an Ollama
                                   Modelfile
  chat RUN_DIR                     talk to a run in the terminal (its template, streaming; /reset, /system)
  merge RUN_DIR --out DIR          fold a LoRA adapter into its base: a standalone model for plain transformers
  check RUN_DIR [--merged DIR | --gguf DIR]
                                   train/serve agreement: base model, chat template, answers stop at end of turn
  push RUN_DIR --repo-id ORG/NAME  check, regression gate, model card, upload (adapter, --merged DIR or --gguf DIR)

`llmft COMMAND --help` lists a command's options.
"""
DATA_USAGE = "usage: llmft data {convert,build,report} ... (llmft data ACTION --help lists its options)"


def _setup_logging() -> None:
    """Log once per process group: rank 0 at INFO, the others at WARNING."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("llmft").setLevel(level)
    # bitsandbytes announces a missing optional kernel package on import; it changes nothing here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score announces its tokenizer on every call
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # 8-bit bitsandbytes layers say this on every matmul; it is how LLM.int8 works, not a problem.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    # TRL 1.16 still calls transformers' old checkpointing name internally; users cannot act on it.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


# Each command parses its options and returns the call that does the work, so the parsing can be tested alone.


def _train(argv: list[str]) -> Callable[[], None]:
    from llmft.config import cli_help, load_recipe

    if not argv or argv[0] in ("-h", "--help"):
        return lambda: print(cli_help())
    recipe = load_recipe(argv[0], argv[1:])

    def run_training() -> None:
        from llmft.train import train

        train(recipe)

    return run_training


def _compare(argv: list[str]) -> Callable[[], None]:
    from llmft.compare import CompareOptions, compare_command

    overrides: list[str] = []
    (options,) = parse([CompareOptions], argv, "llmft compare", rest=overrides,
                       description="Train recipes (e.g. fine-tune vs from scratch) at several data sizes on one token "
                                   "budget. Other --key value options override every recipe.")
    return lambda: compare_command(options, overrides)


def _data(argv: list[str]) -> Callable[[], None]:
    action, rest = (argv[0], argv[1:]) if argv else ("", [])
    prog, command = f"llmft data {action}", "llmft data " + " ".join(argv)
    if action == "convert":
        from llmft.dataset.build import BuildOptions, ConvertOptions, SourceOptions, convert_command

        options = parse([ConvertOptions, SourceOptions, BuildOptions], rest, prog)
        return lambda: convert_command(*options, command)
    if action == "build":
        from llmft.dataset.build import BuildFileOptions, build_command

        options = parse([BuildFileOptions], rest, prog)
        return lambda: build_command(*options, command)
    if action == "report":
        from llmft.dataset.report import ReportOptions, report_command

        options = parse([ReportOptions], rest, prog)
        return lambda: report_command(*options)
    if action in ("", "-h", "--help"):
        return lambda: print(DATA_USAGE)
    raise _unknown("data " + action, DATA_USAGE)


def _selfchat(argv: list[str]) -> Callable[[], None]:
    from llmft.synth.backends import BackendOptions, Sampling
    from llmft.synth.selfchat import SelfChatRunOptions, SelfChatSettings, selfchat_command

    if argv[:1] == ["feedback"]:
        return _feedback(argv[1:])
    options = parse([SelfChatRunOptions, SelfChatSettings, Sampling, BackendOptions], argv, "llmft selfchat",
                    description="Generate multi-turn dialogues by self-chat.", config_flag="config")
    return lambda: selfchat_command(*options, "llmft selfchat " + " ".join(argv))


def _feedback(argv: list[str]) -> Callable[[], None]:
    from llmft.judge import JudgeOptions
    from llmft.synth.backends import BackendOptions, Sampling
    from llmft.synth.feedback import FeedbackOptions, feedback_command

    options = parse([FeedbackOptions, Sampling, BackendOptions, JudgeOptions], argv, "llmft selfchat feedback",
                    description="Baize v2's self-distillation with feedback: sample answers, a judge grades them; "
                                "the best answers (sft/) and best vs worst (dpo/).", defaults={"temperature": 0.9})
    return lambda: feedback_command(*options, "llmft selfchat feedback " + " ".join(argv))


def _augment(argv: list[str]) -> Callable[[], None]:
    from llmft.synth.augment import SAMPLING_DEFAULTS, AugmentFiles, AugmentSettings, augment_command
    from llmft.synth.backends import BackendOptions, Sampling

    options = parse([AugmentFiles, AugmentSettings, Sampling, BackendOptions], argv, "llmft augment",
                    description="Paraphrase or back-translate the user turns of a JSONL chat dataset; answers are "
                                "kept.", defaults=SAMPLING_DEFAULTS)
    return lambda: augment_command(*options)


def _eval(argv: list[str]) -> Callable[[], None]:
    from llmft.evaluation import OPTIONS, RENAMED, evaluate_command, run_defaults

    target = parse(OPTIONS, argv, "llmft eval", renamed=RENAMED)[0]  # which run, to start from its settings
    options = parse(OPTIONS, argv, "llmft eval", defaults=run_defaults(target.target), renamed=RENAMED)
    return lambda: evaluate_command(*options)


def _estimate(argv: list[str]) -> Callable[[], None]:
    from llmft.estimate import EstimateOptions, estimate_command

    overrides: list[str] = []
    (options,) = parse([EstimateOptions], argv, "llmft estimate", rest=overrides,
                       description="Memory per device and time per epoch of a recipe, before anything is loaded. "
                                   "Other --key value options override the recipe, as for llmft train.")
    return lambda: estimate_command(options, overrides)


def _report(argv: list[str]) -> Callable[[], None]:
    from llmft.report import ReportOptions, report_command

    options = parse([ReportOptions], argv, "llmft report", description="An HTML report of one run or several.")
    return lambda: report_command(*options)


def _export(argv: list[str]) -> Callable[[], None]:
    from llmft.export import ExportOptions, export_command

    options = parse([ExportOptions], argv, "llmft export", description="Export a run for llama.cpp and Ollama.")
    return lambda: export_command(*options)


def _chat(argv: list[str]) -> Callable[[], None]:
    from llmft.chat import ChatOptions, chat_command

    options = parse([ChatOptions], argv, "llmft chat", description="An interactive chat with a run or a model.")
    return lambda: chat_command(*options)


def _merge(argv: list[str]) -> Callable[[], None]:
    from llmft.hub import RunOptions
    from llmft.merge import MergeOptions, merge_command

    target, options = parse([RunOptions, MergeOptions], argv, "llmft merge")
    return lambda: merge_command(target.run, options)


def _check(argv: list[str]) -> Callable[[], None]:
    from llmft.hub import ArtifactOptions, RunOptions, check_command

    options = parse([RunOptions, ArtifactOptions], argv, "llmft check")
    return lambda: check_command(*options)


def _push(argv: list[str]) -> Callable[[], None]:
    from llmft.hub import ArtifactOptions, PushOptions, RunOptions, push_command

    options = parse([RunOptions, ArtifactOptions, PushOptions], argv, "llmft push")
    return lambda: push_command(*options)


COMMANDS = {"train": _train, "compare": _compare, "data": _data, "selfchat": _selfchat, "augment": _augment,
            "eval": _eval, "estimate": _estimate, "report": _report, "chat": _chat, "export": _export, "merge": _merge,
            "check": _check, "push": _push}


class _UnknownCommand(LlmftError):
    exit_code = 2


def _unknown(name: str, usage: str) -> LlmftError:
    return _UnknownCommand(f"unknown command '{name}'.\n\n{usage}")


def run(argv: list[str]) -> int:
    """Run one command; its exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name = " ".join(argv[:2]) if argv[0] == "data" and len(argv) > 1 else argv[0]  # "data convert"
    _setup_logging()
    try:
        command = COMMANDS.get(argv[0])
        if command is None:
            raise _unknown(argv[0], USAGE)
        command(argv[1:])()
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stops at the same step; one message is enough
            print(f"llmft {name}: {stop}", file=sys.stderr)
        return stop.exit_code
    except LlmftError as err:
        print(f"llmft {name}: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        hint = _path_hint(err)
        if hint is None:  # anything else may be a bug: its traceback
            raise
        print(f"llmft {name}: {err.filename}: {err.strerror or err}. {hint}", file=sys.stderr)
        return 1
    return 0


def _path_hint(err: OSError) -> str | None:
    """What to do about a path the user gave that the system refused (the whole story then is the path and the
    system's words); None for any other error."""
    if err.filename is None:
        return None
    if isinstance(err, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return "A file is where a folder goes, or the other way round: choose another path, or move what is there."
    if isinstance(err, PermissionError):
        return "Choose a path you may write to, or change its permissions."
    if err.errno in (errno.ENOSPC, errno.EROFS):
        return "Free some space, or choose a path on another disk."
    return None


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the `llmft` command or `python -m llmft`, not a call from Python code
        argv = sys.argv[1:]
        preload_allocator(argv)  # may start this command line again with jemalloc/tcmalloc (llmft.hardware)
        if int(os.environ.get("WORLD_SIZE") or 1) <= 1:
            sys.exit(run(argv))
        from llmft.train import exit_rank  # a rank of a multi-process launch (torchrun sets WORLD_SIZE)

        try:
            code = run(argv)
        except Exception:  # a bug: its traceback, then the same exit as any other rank's
            traceback.print_exc()
            code = 1
        exit_rank(code)
    sys.exit(run(argv))
