"""`llmft compare`: train several recipes at several data sizes on one token budget, and report eval loss.

The question it answers on the user's own data: does fine-tuning a pretrained model beat training the same
architecture from scratch (`model.init: scratch`), and how does that change with the amount of data? Every
(recipe, size) run sees the same number of training tokens: a small data size is repeated for more epochs. Each
run is an ordinary run directory; the report (report.md, results.json, eval_loss_vs_tokens.png) sits beside them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmft.config import Recipe, load_recipe
from llmft.data import load_splits
from llmft.errors import ConfigError, DataError
from llmft.model import load_tokenizer
from llmft.run_dir import read_run
from llmft.stages import STAGES
from llmft.train import train

log = logging.getLogger(__name__)


@dataclass
class CompareOptions:
    """`llmft compare`'s own options; any other --key value overrides every recipe."""

    recipes: list[str] = field(metadata={"positional": True, "metavar": "RECIPE",
                                         "help": "Recipe YAML files; their file names label the runs."})
    sizes: list[int] = field(metadata={"help": "Training examples per run."})
    out: str = field(metadata={"help": "Report directory (runs go in OUT/runs/)."})
    tokens: int | None = field(default=None, metadata={"help": "Training tokens per run (default: one epoch of "
                                                               "the largest size)."})
    evals: int = field(default=5, metadata={"help": "Evaluations per run, evenly spaced."})

    def __post_init__(self):
        if min(self.sizes) < 1 or self.evals < 1 or (self.tokens is not None and self.tokens < 1):
            raise ConfigError(["--sizes, --tokens and --evals must be positive."], what="the options of llmft compare")


def compare_command(options: CompareOptions, overrides: list[str]) -> None:
    out = compare(options.recipes, options.sizes, Path(options.out), options.tokens, options.evals, overrides)
    print((out / "report.md").read_text())
    print(f"Report: {out / 'report.md'} and {out / 'report.html'}")


COMPARED_STAGES = ("sft", "pretrain")  # the stages whose runs log eval_loss over input_ids


def subset_tokens(recipe: Recipe) -> tuple[int, int, int]:
    """Rows available, rows used and their tokens, for the recipe's training data as training will see it."""
    data, args = recipe.data, recipe.training
    tokenizer = load_tokenizer(recipe.model, args.trust_remote_code)
    every, _ = load_splits(data.train_data, data.eval_data, data.eval_fraction, args.seed)
    rows = every.select(range(min(data.max_train_examples or len(every), len(every))))
    dataset, _ = STAGES[args.stage].prepare(rows, tokenizer, recipe, data.train_data)
    return len(every), len(dataset), sum(len(ids) for ids in dataset["input_ids"])


def run_overrides(size: int, out: Path, epochs: float, evals: int) -> list[str]:
    """What compare sets in each recipe: the data size, the epochs that meet the budget, evaluations by ratio (a
    ratio under 1: the Trainer reads 1 as every step, so one evaluation is at the end of training)."""
    ratio = min(1 / evals, 0.999999)
    return ["--max_train_examples", str(size), "--output_dir", str(out), "--num_train_epochs", f"{epochs:.6f}",
            "--max_steps", "-1", "--eval_strategy", "steps", "--eval_steps", f"{ratio:.6f}",
            "--save_strategy", "no", "--overwrite_output_dir", "true", "--resume_from_checkpoint", "no",
            "--include_num_input_tokens_seen", "non_padding"]  # the x axis of every curve


def curve(run: Path) -> tuple[list[int], list[float]]:
    """(tokens trained, eval loss) at every evaluation of a run, the one before training (metrics.json) first."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    before = read_run(run).metrics.before
    points = {0: before["eval_loss"]} if before else {}
    for entry in history:
        if "eval_loss" in entry:
            points[entry["num_input_tokens_seen"]] = entry["eval_loss"]
    tokens = sorted(points)
    return tokens, [points[t] for t in tokens]


def compare(recipes: list[str], sizes: list[int], out: Path, tokens: int | None = None, evals: int = 5,
            argv: list[str] | None = None) -> Path:
    """Train every recipe at every size with the same token budget; write the report into `out`."""
    labels = [Path(r).stem for r in recipes]
    if len(set(labels)) != len(labels):
        raise ConfigError([f"recipes need distinct file names (they label the runs): {labels}"],
                          what="the options of llmft compare")
    plan = _plan(recipes, sorted(sizes), tokens, argv or [])
    budget = plan["budget"]
    log.info("Token budget per run: %s (%s)", f"{budget:,}", plan["budget_from"])
    results: dict[str, Any] = {"budget_tokens": budget, "budget_from": plan["budget_from"], "sizes": sorted(sizes),
                               "recipes": dict(zip(labels, recipes)), "runs": {}}
    for label, path in zip(labels, recipes):
        for size in sorted(sizes):
            rows, run_tokens = plan["subsets"][(path, size)]
            epochs = budget / run_tokens
            run = out / "runs" / f"{label}-{size}"
            log.info("compare: %s on %d examples (%s tokens) for %.2f epochs", label, rows, f"{run_tokens:,}", epochs)
            started = time.time()
            train(load_recipe(path, [*(argv or []), *run_overrides(size, run, epochs, evals)]))
            seen, losses = curve(run)
            results["runs"].setdefault(label, {})[str(size)] = {
                "examples": rows, "epochs": round(epochs, 3), "tokens": seen, "eval_loss": losses,
                "final_eval_loss": losses[-1], "best_eval_loss": min(losses), "seconds": round(time.time() - started, 1),
                "run_dir": str(run)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "eval_loss_vs_tokens.png")
    (out / "report.md").write_text(report(results))
    from llmft.report import write_report

    runs = [read_run(Path(r["run_dir"])) for sizes_ in results["runs"].values() for r in sizes_.values()]
    write_report(runs, out / "report.html")  # every run's curves and metrics, recipe differences side by side
    return out


def _plan(recipes: list[str], sizes: list[int], tokens: int | None, argv: list[str]) -> dict[str, Any]:
    """Each (recipe, size)'s rows and tokens, and the budget: `tokens`, else one epoch of the largest subset."""
    subsets = {}
    for path in recipes:
        for size in sizes:
            recipe = load_recipe(path, [*argv, "--max_train_examples", str(size)])
            if recipe.training.stage not in COMPARED_STAGES:
                raise ConfigError([f"{path}: training.stage {recipe.training.stage}: compare measures eval loss "
                                   f"against tokens trained, which stages {' and '.join(COMPARED_STAGES)} have; "
                                   "compare other stages' runs side by side with llmft report RUN RUN."],
                                  what="the options of llmft compare")
            available, rows, count = subset_tokens(recipe)
            if size > available:
                raise DataError(f"--sizes {size} is more than the {available} training rows of "
                                f"{recipe.data.train_data} (after the eval split); use sizes up to {available}.")
            subsets[(path, size)] = (rows, count)
    if tokens is None:
        tokens = max(count for _, count in subsets.values())
        return {"subsets": subsets, "budget": tokens, "budget_from": f"one epoch of the largest size, {max(sizes)}"}
    return {"subsets": subsets, "budget": tokens, "budget_from": "--tokens"}


def plot(results: dict[str, Any], path: Path) -> None:
    """Eval loss against tokens trained, one panel per data size, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for label, runs in results["runs"].items():
            run = runs[str(size)]
            ax.plot(run["tokens"], run["eval_loss"], marker="o", markersize=3, label=label)
        ax.set_title(f"{size} training examples")
        ax.set_xlabel("tokens trained")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval loss (held-out, assistant tokens)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any]) -> str:
    """A Markdown table of final and best eval loss per size and recipe, and which recipe won each size."""
    labels = list(results["runs"])
    lines = [f"# Fine-tune or train from scratch? ({', '.join(labels)})", "",
             f"Every run trained on {results['budget_tokens']:,} tokens ({results['budget_from']}); smaller data sizes "
             "are repeated for more epochs. Eval loss is on the same held-out set for every run.", "",
             "| training examples | epochs | " + " | ".join(f"{label} eval loss (best)" for label in labels)
             + " | lowest |", "|---|---|" + "---|" * len(labels) + "---|"]
    for size in results["sizes"]:
        runs = [results["runs"][label][str(size)] for label in labels]
        cells = [f"{r['final_eval_loss']:.3f} ({r['best_eval_loss']:.3f})" for r in runs]
        winner = min(zip(labels, runs), key=lambda x: x[1]["final_eval_loss"])[0]
        epochs = "/".join(sorted({f"{r['epochs']:.2f}" for r in runs}))
        lines.append(f"| {size} | {epochs} | " + " | ".join(cells) + f" | {winner} |")
    lines += ["", "![eval loss vs tokens](eval_loss_vs_tokens.png)", "",
              "Runs: " + ", ".join(f"`{r['run_dir']}`" for runs in results["runs"].values() for r in runs.values()),
              ""]
    return "\n".join(lines)
