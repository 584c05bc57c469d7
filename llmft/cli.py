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

  compare RECIPE... --sizes N... --out DIR
                                   train each recipe (e.g. fine-tune vs model.init: scratch) at each data size on one
                                   token budget; report.md + eval loss vs tokens plot

  data convert SRC... --out DIR   convert Alpaca/ShareGPT/OpenAI/OASST/prompt-completion/column data into one chat
                                   dataset: validate, normalise, dedupe, decontaminate, split; manifest + data card
  data build BUILD.yaml            the same from a YAML file (several sources, weighted mixes)
  data report DATASET --recipe R   pre-flight report: lengths, truncation, loss share, a rendered loss mask
  eval RUN_DIR|MODEL [--baseline B] held-out loss, generation metrics and general-text perplexity; with a baseline,
                                   side by side with deltas; writes eval_results.json and eval_report.md
  merge RUN_DIR --out DIR          fold a LoRA adapter into its base: a standalone model for plain transformers
  check RUN_DIR [--merged DIR]     train/serve agreement: base model, chat template, answers stop at end of turn
  push RUN_DIR --repo-id ORG/NAME  check, regression gate, model card, upload (adapter, or --merged DIR)
  selfchat --seeds FILE --out DIR  Baize-style self-chat: one model writes both sides of dialogues about seed
                                   questions (local model or OpenAI-compatible server); resumable
  augment DATA --out FILE          more rows by paraphrasing or back-translating user turns (same backends)

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
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score announces its tokenizer on every call
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # 8-bit bitsandbytes layers say this on every matmul; it is how LLM.int8 works, not a problem.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
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
    from llmft.checkpoint import Preempted
    from llmft.train import train

    try:
        train(recipe)
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stops at the same step; one message is enough
            print(f"llmft train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's code for a signal: schedulers and retry loops see "not finished"
    except _training_errors() as err:
        print(f"llmft train: {err}", file=sys.stderr)
        return 1
    return 0


def _training_errors() -> tuple[type[Exception], ...]:
    """Errors of bad input or settings met while training: shown as one message, not a traceback."""
    from llmft.checkpoint import NonFiniteError, ResumeError
    from llmft.data import DataError
    from llmft.hub import HubError
    from llmft.model import ModelError
    from llmft.run_dir import RunDirError
    from llmft.train import LaunchError
    from llmft.tuning import TuningError

    return DataError, ModelError, RunDirError, LaunchError, HubError, ResumeError, NonFiniteError, TuningError


def _compare(argv: list[str]) -> int:
    import argparse
    from pathlib import Path

    from llmft.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="llmft compare", description="Train recipes (e.g. fine-tune vs from scratch) at several data sizes on "
        "one token budget; write report.md, results.json and eval_loss_vs_tokens.png. Other --key value options "
        "override every recipe.")
    parser.add_argument("recipes", nargs="+", help="recipe YAML files; their file names label the runs")
    parser.add_argument("--sizes", nargs="+", type=int, required=True, help="training examples per run")
    parser.add_argument("--tokens", type=int, help="training tokens per run (default: one epoch of the largest size)")
    parser.add_argument("--evals", type=int, default=5, help="evaluations per run, evenly spaced (default 5)")
    parser.add_argument("--out", required=True, help="report directory (runs go in OUT/runs/)")
    args, overrides = parser.parse_known_args(argv)
    if min(args.sizes) < 1 or args.evals < 1 or (args.tokens is not None and args.tokens < 1):
        parser.error("--sizes, --tokens and --evals must be positive")
    from llmft.checkpoint import Preempted
    from llmft.compare import compare

    try:
        out = compare(args.recipes, args.sizes, Path(args.out), args.tokens, args.evals, overrides)
    except Preempted as stop:
        print(f"llmft compare: stopped by signal {stop.signum}; runs that finished are in {args.out}/runs/ (rerun to "
              "train them all again).", file=sys.stderr)
        return 128 + stop.signum
    except (ConfigError, *_training_errors()) as err:
        print(f"llmft compare: {err}", file=sys.stderr)
        return 1
    print((out / "report.md").read_text())
    print(f"Report: {out / 'report.md'}")
    return 0


def _data_parser():
    import argparse

    from llmft.formats import FORMATS

    parser = argparse.ArgumentParser(prog="llmft data", description="Build and inspect training datasets.")
    sub = parser.add_subparsers(dest="action", required=True)
    convert = sub.add_parser("convert", help="convert and clean data files or Hub datasets into one chat dataset")
    convert.add_argument("sources", nargs="+", help="files, folders or Hub dataset ids (org/name)")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument("--format", choices=FORMATS, help="input format (default: detected from the first row)")
    convert.add_argument("--split", default="train", help="split of a Hub dataset")
    convert.add_argument("--prompt-field", default="question", help="--format columns: the prompt column")
    convert.add_argument("--completion-field", default="answer", help="--format columns: the answer column")
    convert.add_argument("--system-field", help="--format columns: a system prompt column")
    convert.add_argument("--oasst-best-only", action="store_true", help="OASST: best-ranked path only")
    convert.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                         help="bad rows: stop and list them (fail), or write them to rejects.jsonl and go on (skip)")
    convert.add_argument("--system-prompt", help="add this system message where a conversation has none")
    convert.add_argument("--no-normalise", dest="normalise", action="store_false",
                         help="keep text as is (default: NFC, no zero-width chars, trimmed lines)")
    convert.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="keep exact duplicates")
    convert.add_argument("--near-dedupe", default="0.85",
                         help="MinHash Jaccard threshold for near duplicates, or 'off' (default 0.85)")
    convert.add_argument("--decontaminate", nargs="*", default=[], metavar="EVAL",
                         help="eval sets (files or Hub ids) whose n-grams training rows must not share")
    convert.add_argument("--ngram", type=int, default=13, help="n-gram size for decontamination (words)")
    convert.add_argument("--test-fraction", type=float, default=0.0, help="share of rows held out as test/")
    convert.add_argument("--seed", type=int, default=0)
    build = sub.add_parser("build", help="build a dataset from a YAML file of sources and settings")
    build.add_argument("config", help="build YAML (see data_prep/builds/)")
    build.add_argument("--out", help="output directory (overrides the file's)")
    rep = sub.add_parser("report", help="what training will see: lengths, truncation, loss share, masks")
    rep.add_argument("dataset", help="a dataset directory (e.g. a build's train/) or a .jsonl/.parquet file")
    rep.add_argument("--recipe", help="the recipe training will use (its model, max_length and overlong policy)")
    rep.add_argument("--model", help="or a model (Hub id, path or smollm2-135m-instruct) with --max-length")
    rep.add_argument("--max-length", type=int, default=None)
    rep.add_argument("--out", help="where report.json and length_histogram.png go (default: DATASET_report/)")
    return parser


def _data(argv: list[str]) -> int:
    from llmft.config import ConfigError
    from llmft.data import DataError
    from llmft.model import ModelError
    from llmft.prep import BuildError

    args = _data_parser().parse_args(argv)
    try:
        if args.action == "report":
            return _data_report(args)
        manifest = _data_build(args, argv)
    except (BuildError, DataError, ModelError, ConfigError) as err:
        print(f"llmft data {args.action}: {err}", file=sys.stderr)
        return 1
    for name, output in manifest["output"].items():
        print(f"{name}: {output['rows']} rows -> {output['path']}")
    return 0


def _data_build(args, argv: list[str]) -> dict:
    from llmft.prep import BuildConfig, Source, build, load_build_config

    command = "llmft data " + " ".join(argv)
    if args.action == "build":
        return build(load_build_config(args.config, args.out), command)
    near = None if args.near_dedupe == "off" else float(args.near_dedupe)
    sources = [Source(path, format=args.format, split=args.split, prompt_field=args.prompt_field,
                      completion_field=args.completion_field, system_field=args.system_field,
                      oasst_best_only=args.oasst_best_only) for path in args.sources]
    config = BuildConfig(sources=sources, out=args.out, on_error=args.on_error, normalise=args.normalise,
                         system_prompt=args.system_prompt, dedupe=args.dedupe, near_dedupe_threshold=near,
                         decontaminate=args.decontaminate, ngram=args.ngram, test_fraction=args.test_fraction,
                         seed=args.seed)
    return build(config, command)


def _data_report(args) -> int:
    from pathlib import Path

    from llmft import data_report
    from llmft.config import ModelConfig, load_recipe
    from llmft.data import load_rows
    from llmft.model import load_tokenizer

    if bool(args.recipe) == bool(args.model):
        print("llmft data report: give --recipe RECIPE or --model MODEL (one of them).", file=sys.stderr)
        return 2
    if args.recipe:
        recipe = load_recipe(args.recipe)
        tokenizer = load_tokenizer(recipe.model, recipe.training.trust_remote_code)
        max_length, overlong = args.max_length or recipe.training.max_length, recipe.data.overlong
    else:
        tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
        max_length, overlong = args.max_length, "drop"
    dataset = Path(args.dataset)
    source = dataset / "train" if (dataset / "train" / "state.json").exists() else dataset
    result = data_report.report(load_rows(str(source)), tokenizer, max_length, overlong, str(source))
    print(data_report.format_table(result))
    out = Path(args.out) if args.out else source.parent / f"{source.name.split('.')[0]}_report"
    paths = data_report.write(result, out)
    print(f"\nSaved {paths['json']} and {paths['histogram']}")
    return 0


def _selfchat_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="llmft selfchat", description="Generate multi-turn dialogues by self-chat.")
    parser.add_argument("--config", help="YAML file whose keys are these options' names (flags override it)")
    parser.add_argument("--seeds", help=".txt (one question a line), or a JSONL/JSON/CSV/Parquet file or Hub id")
    parser.add_argument("--seed-column", help="column holding the questions (not for .txt)")
    parser.add_argument("--seed-id-column", help="column of unique seed ids (default: file and line)")
    parser.add_argument("--limit", type=int, help="only the first N seeds")
    parser.add_argument("--out", help="output folder: dialogues.jsonl (resumable) and dataset/")
    parser.add_argument("--mode", default="roleplay", choices=("transcript", "alternating", "roleplay"))
    _add_backend_args(parser)
    parser.add_argument("--turns-min", type=int, default=1)
    parser.add_argument("--turns-max", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16, help="dialogues generated together (16: fastest measured here)")
    parser.add_argument("--min-answer-chars", type=int, default=10)
    parser.add_argument("--max-repetition", type=float, default=0.5)
    parser.add_argument("--templates", help="YAML mapping of template names (transcript, alternating, "
                                            "user_simulator) to text with a {seed} placeholder")
    parser.add_argument("--test-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _add_backend_args(parser) -> None:
    """The generation backend options shared by selfchat and augment."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="local model: Hub id, path or built-in name")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (instead of --model)")
    parser.add_argument("--api-model", help="model name on that server")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP requests at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    parser.add_argument("--max-retries", type=int, default=5)


def _make_backend(args):
    """An OpenAI-compatible HTTP backend (--base-url) or a local model."""
    from llmft.backends import LocalBackend, OpenAIBackend

    if args.base_url:
        return OpenAIBackend(args.base_url, args.api_model, args.api_key_env, args.concurrency, args.timeout,
                             args.max_retries)
    from llmft.config import ModelConfig, PeftSettings
    from llmft.model import load_model, load_tokenizer

    model_cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype)
    backend = LocalBackend(load_model(model_cfg, PeftSettings(method="full")), load_tokenizer(model_cfg),
                           args.batch_size)
    backend.name = args.model
    return backend


def _augment(argv: list[str]) -> int:
    import argparse
    from pathlib import Path

    from llmft.augment import MODES, AugmentConfig, AugmentError, augment_file
    from llmft.backends import BackendError, Sampling
    from llmft.model import ModelError

    parser = argparse.ArgumentParser(
        prog="llmft augment", description="Paraphrase or back-translate the user turns of a JSONL chat dataset "
        "(messages or prompt/completion) with a local model or an OpenAI-compatible server; answers are kept.")
    parser.add_argument("data", help="JSONL file of rows with messages (or prompt/completion)")
    parser.add_argument("--out", required=True, help="JSONL file: the source rows, then the new ones")
    parser.add_argument("--mode", default="paraphrase", choices=MODES)
    parser.add_argument("--pivot", default="French", help="backtranslate: the language to go through")
    parser.add_argument("--copies", type=int, default=1, help="rewrites per source row")
    parser.add_argument("--only-new", action="store_true", help="write only the augmented rows")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16, help="rewrites generated together")
    _add_backend_args(parser)
    args = parser.parse_args(argv)
    if args.base_url and not args.api_model:
        parser.error("--base-url needs --api-model")
    if args.copies < 1:
        parser.error("--copies must be >= 1")
    cfg = AugmentConfig(mode=args.mode, pivot=args.pivot, copies=args.copies, batch_size=args.batch_size,
                        sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p))
    try:
        summary = augment_file(Path(args.data), Path(args.out), _make_backend(args), cfg, args.only_new)
    except (AugmentError, BackendError, ModelError) as err:
        print(f"llmft augment: {err}", file=sys.stderr)
        return 1
    rejected = ", ".join(f"{n} {k}" for k, n in summary["rejected"].items()) or "none"
    print(f"{summary['source_rows']} source rows -> {summary['augmented_rows']} new rows (rejected: {rejected}); "
          f"wrote {summary['written']} rows to {summary['out']}")
    return 0


def _selfchat(argv: list[str]) -> int:
    import difflib

    from llmft.backends import BackendError
    from llmft.model import ModelError
    from llmft.prep import BuildError
    from llmft.selfchat import SelfChatError

    parser = _selfchat_parser()
    args = parser.parse_args(argv)
    if args.config:
        options = {a.dest for a in parser._actions}
        try:
            raw = _read_mapping(args.config)
        except SelfChatError as err:
            print(f"llmft selfchat: {err}", file=sys.stderr)
            return 2
        unknown = [k for k in raw if k.replace("-", "_") not in options]
        if unknown:
            hints = [f"'{k}'" + "".join(f" (did you mean '{m}'?)" for m in difflib.get_close_matches(
                k.replace("-", "_"), sorted(options), n=1)) for k in unknown]
            print(f"llmft selfchat: unknown keys in {args.config}: {', '.join(hints)}", file=sys.stderr)
            return 2
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in raw.items()})
        args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--seeds", args.seeds), ("--out", args.out)) if not value]
    if args.base_url and not args.api_model:
        missing.append("--api-model (with --base-url)")
    if missing:
        print(f"llmft selfchat: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        _run_selfchat(args, argv)
    except (SelfChatError, BackendError, ModelError, BuildError) as err:
        print(f"llmft selfchat: {err}", file=sys.stderr)
        return 1
    return 0


def _read_mapping(path: str) -> dict:
    """A YAML file that must hold a mapping; a SelfChatError naming the file otherwise."""
    import yaml

    from llmft.selfchat import SelfChatError

    try:
        raw = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SelfChatError(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise SelfChatError(f"{path}: expected a mapping of name: value, got {type(raw).__name__}.")
    return raw


def _run_selfchat(args, argv: list[str]) -> None:
    from pathlib import Path

    from llmft import selfchat
    from llmft.backends import Sampling

    templates = dict(selfchat.TEMPLATES)
    if args.templates:
        overrides = _read_mapping(args.templates)
        unknown = sorted(set(overrides) - set(templates))
        if unknown:
            raise selfchat.SelfChatError(f"{args.templates}: unknown templates {unknown}; "
                                         f"the templates are {', '.join(templates)}.")
        templates.update(overrides)
    cfg = selfchat.SelfChatConfig(
        mode=args.mode, turns_min=args.turns_min, turns_max=args.turns_max,
        sampling=Sampling(args.max_new_tokens, args.temperature, args.top_p),
        min_answer_chars=args.min_answer_chars, max_repetition=args.max_repetition, templates=templates,
        batch_size=args.batch_size)
    seeds = selfchat.read_seeds(args.seeds, args.seed_column, args.seed_id_column, args.limit)
    backend = _make_backend(args)
    out = Path(args.out)
    speed = selfchat.generate(seeds, backend, cfg, out)
    meta = {"command": "llmft selfchat " + " ".join(argv), "seeds": args.seeds, "model": backend.name,
            "mode": cfg.mode, **selfchat.config_dict(cfg), **speed}
    manifest = selfchat.finalize(out, meta, args.test_fraction, args.seed)
    filters = manifest["self_chat"]["filters"]
    print(f"dialogues: {manifest['self_chat']['dialogues']} ({', '.join(f'{n} {k}' for k, n in filters.items())})")
    for name, output in manifest["output"].items():
        print(f"{name}: {output['rows']} rows -> {output['path']}")


def _eval_parser():
    import argparse

    from llmft.config import EVAL_METRICS

    parser = argparse.ArgumentParser(prog="llmft eval", description="Evaluate a run directory or a model.")
    parser.add_argument("target", help="a run directory (adapter or full model) or a model id/path/built-in name")
    parser.add_argument("--baseline", help="evaluate this model the same way, side by side ('base' = the run's base model)")
    parser.add_argument("--data", help="held-out data (messages or prompt/completion); default: the run's eval data")
    parser.add_argument("--num-generate", type=int, default=32, help="prompts answered by greedy generation")
    parser.add_argument("--metrics", nargs="+", default=["exact_match", "rouge_l"], choices=EVAL_METRICS)
    parser.add_argument("--answer-extractor", default="none", help="none | gsm8k | last_number | regex:PATTERN")
    parser.add_argument("--few-shot", type=int, default=0, help="worked examples from --few-shot-data before each prompt")
    parser.add_argument("--few-shot-data", help="where the few-shot examples come from (default: --data)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024, help="longest example for the loss (truncated)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N rows of the data for the loss")
    parser.add_argument("--lm-eval-tasks", nargs="+", default=[],
                        help="lm-evaluation-harness tasks: standard ones (e.g. arc_easy, needs their data) or YAML "
                             "tasks over local files; shipped offline: llmft_dates (generative, exact match), "
                             "llmft_facts_mc (multiple choice)")
    parser.add_argument("--lm-eval-include", nargs="+", help="folders of your own lm-eval task YAMLs")
    parser.add_argument("--lm-eval-limit", type=int, help="only the first N examples of each task")
    parser.add_argument("--lm-eval-no-chat-template", dest="lm_eval_chat_template", action="store_false",
                        help="feed lm-eval prompts as plain text (default: through the model's chat template)")
    parser.add_argument("--out", help="where results go (default: the run directory, or eval_<model>/)")
    return parser


def _eval(argv: list[str]) -> int:
    from llmft.data import DataError
    from llmft.model import ModelError
    from llmft.run_dir import RunDirError

    args = _eval_parser().parse_args(argv)
    try:
        _run_eval(args)
    except (DataError, ModelError, RunDirError, ValueError) as err:
        print(f"llmft eval: {err}", file=sys.stderr)
        return 1
    return 0


def _run_eval(args) -> None:
    import json
    from pathlib import Path

    from llmft import evaluate
    from llmft.data import load_rows

    model, tokenizer, run = evaluate.load_for_eval(args.target)
    if args.data:
        data, rows = args.data, load_rows(args.data)
    elif run:
        data, rows = evaluate.run_eval_rows(run)
    else:
        raise ValueError("no held-out data: pass --data FILE.")
    if args.limit:
        rows = rows.select(range(min(args.limit, len(rows))))
    items = evaluate.prompts_and_references(rows, args.num_generate)
    if args.few_shot:
        items = evaluate.with_few_shot(items, evaluate.prompts_and_references(load_rows(args.few_shot_data or data), args.few_shot))
    tuned = evaluate.evaluate_model(model, tokenizer, rows, items, args)
    baseline, baseline_name = None, None
    if args.baseline:
        baseline_name = run["recipe"]["model"]["name_or_path"] if args.baseline == "base" and run else args.baseline
        base_model, base_tokenizer, _ = evaluate.load_for_eval(baseline_name)
        baseline = evaluate.evaluate_model(base_model, base_tokenizer, rows, items, args)
    name = Path(args.target).name
    out = Path(args.out) if args.out else Path(args.target) if run else Path(f"eval_{name}")
    out.mkdir(parents=True, exist_ok=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "answers"}  # noqa: E731
    results = {"target": args.target, "data": data, "settings": {k: v for k, v in vars(args).items() if k != "target"},
               "results": strip(tuned), "baseline": strip(baseline) if baseline else None,
               "baseline_model": baseline_name,
               "deltas": {k: tuned[k] - baseline[k] for k in strip(tuned)} if baseline else None,
               "samples": [{"prompt": evaluate.prompt_text(it["prompt"]), "reference": it["reference"],
                            "answer": tuned["answers"][i], "baseline_answer": baseline["answers"][i] if baseline else None}
                           for i, it in enumerate(items)] if items else []}
    (out / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    report = evaluate.report_markdown(name, strip(tuned), strip(baseline) if baseline else None, baseline_name)
    (out / "eval_report.md").write_text(report)
    print(report + f"\nSaved {out / 'eval_results.json'} and {out / 'eval_report.md'}")


def _hub_parser(action: str):
    import argparse

    parser = argparse.ArgumentParser(prog=f"llmft {action}")
    parser.add_argument("run", help="a run directory made by llmft train")
    if action == "merge":
        parser.add_argument("--out", required=True, help="folder for the merged model")
        parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
        parser.add_argument("--max-shard-size", default="2GB")
    else:
        parser.add_argument("--merged", help="check/push this merged model folder instead of the adapter")
    if action == "push":
        parser.add_argument("--repo-id", help="ORG/NAME (default: the recipe's hub.repo_id)")
        parser.add_argument("--public", dest="private", action="store_false", help="create the repository public")
        parser.add_argument("--revision", help="branch to push to (created if missing)")
        parser.add_argument("--gate", nargs="*", help="gating metrics (default: the recipe's hub.gate_metrics)")
        parser.add_argument("--force", action="store_true", help="push even when the gate finds a regression")
    return parser


def _hub(action: str, argv: list[str]) -> int:
    from pathlib import Path

    from llmft import hub
    from llmft.model import ModelError
    from llmft.run_dir import RunDirError, read_run

    args = _hub_parser(action).parse_args(argv)
    run = Path(args.run)
    try:
        if action == "merge":
            print(f"merged model: {hub.merge(run, Path(args.out), args.dtype, args.max_shard_size)}")
        elif action == "check":
            result = hub.check(run, Path(args.merged) if args.merged else None)
            print(f"check passed: {result['stopped_at_end_of_turn']}/{result['prompts']} answers stopped at the "
                  "end-of-turn token; chat template and base model match training.")
        else:
            recipe_hub = read_run(run)["recipe"]["hub"]
            repo_id = args.repo_id or recipe_hub["repo_id"]
            if not repo_id:
                raise hub.HubError("no repository: pass --repo-id ORG/NAME or set hub.repo_id in the recipe.")
            gates = recipe_hub["gate_metrics"] if args.gate is None else args.gate
            url = hub.push(run, repo_id, args.private, args.revision, Path(args.merged) if args.merged else None,
                           gates, args.force)
            print(f"pushed to {repo_id}: {url}")
    except (hub.HubError, RunDirError, ModelError) as err:
        print(f"llmft {action}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # the Hub client's errors (HTTP, auth, URI) have many types; report, do not trace
        if type(err).__module__.startswith("huggingface_hub"):
            print(f"llmft {action}: the Hub refused: {err}", file=sys.stderr)
            return 1
        raise
    return 0


COMMANDS = {"train": _train, "compare": _compare, "data": _data, "selfchat": _selfchat, "augment": _augment,
            "eval": _eval,
            "merge": lambda argv: _hub("merge", argv), "check": lambda argv: _hub("check", argv),
            "push": lambda argv: _hub("push", argv)}


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
