"""Verifiable rewards for the GRPO stage, named in the recipe (`training.rewards`), weighted by TRL's
`training.reward_weights`:

  exact_match[:EXTRACTOR]   1 when the answer matches the row's reference after an answer extractor (none, gsm8k,
                            last_number, regex:PATTERN: the same extractors as the eval), else 0
  format[:REGEX]            1 when the whole completion matches REGEX (default: some reasoning, then a last line
                            `#### <number>`, GSM8K's answer format), else 0
  length:N                  0 up to N completion tokens, then falling linearly to -1 at 2N (a length penalty)
  python:MODULE:FUNCTION    a function of your own (MODULE a dotted name or a .py path) with TRL's signature:
                            f(prompts, completions, completion_ids, **columns) -> list[float | None]

Each is wrapped so that a reward that raises, returns a non-finite value or the wrong number of values is an error
naming the reward and the example (`example_id`), instead of a NaN deep inside the loss. None is TRL's "does not
apply to this example" and passes through.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable
from pathlib import Path

from llmft.errors import ConfigError, LlmftError

DEFAULT_FORMAT = r"(?s)\S.*\n#### *-?[\d,]*\.?\d+\s*"
KINDS = ("exact_match", "format", "length", "python")


class RewardError(LlmftError):
    """A reward function failed or returned something the trainer cannot use."""


def spec_problems(spec: str) -> list[str]:
    """What is wrong with one reward spec (empty when it is usable); imports a python: reward to check it."""
    kind = spec.partition(":")[0]
    if kind not in KINDS:
        return [f"training.rewards: '{spec}' is not a reward; use one of {', '.join(k + '[:...]' for k in KINDS)}."]
    try:
        build_reward(spec)
    except (ConfigError, ValueError, re.error) as err:
        return [f"training.rewards: '{spec}': {err}"]
    return []


def build_reward(spec: str) -> Callable:
    """The reward function of one spec, with TRL's signature, named after the spec for TRL's per-reward logs."""
    kind, _, arg = spec.partition(":")
    if kind == "exact_match":
        function = _exact_match(arg or "none")
    elif kind == "format":
        function = _format(arg or DEFAULT_FORMAT)
    elif kind == "length":
        function = _length(arg)
    elif kind == "python":
        function = _python(arg)
    else:
        raise ConfigError([f"training.rewards: '{spec}' is not a reward; use one of {', '.join(KINDS)}."])
    return _checked(function, spec)


def completion_text(completion) -> str:
    """A completion as text: TRL passes conversational completions as a list of assistant messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def _exact_match(extractor: str) -> Callable:
    from llmft.evaluation import extract, matches
    from llmft.schema import without_reasoning

    extract("", extractor)  # an unknown extractor fails here, when the recipe loads

    def exact_match(prompts, completions, reference, **_):  # the answer after any reasoning, as the eval scores it
        return [float(matches(without_reasoning(completion_text(c)), ref, extractor))
                for c, ref in zip(completions, reference)]

    return exact_match


def _format(pattern: str) -> Callable:
    compiled = re.compile(pattern)

    def format_match(prompts, completions, **_):
        return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return format_match


def _length(arg: str) -> Callable:
    if not arg.isdigit() or int(arg) == 0:
        raise ValueError("length:N needs N, a positive number of completion tokens (e.g. length:256).")
    limit = int(arg)

    def length_penalty(prompts, completions, completion_ids, **_):
        return [-min(1.0, max(0, len(ids) - limit) / limit) for ids in completion_ids]

    return length_penalty


def _python(arg: str) -> Callable:
    module_name, _, name = arg.rpartition(":")
    if not module_name or not name:
        raise ValueError("python:MODULE:FUNCTION names a module (dotted, or a .py file) and a function in it.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"{path}: no such file.")
            # A name of its own: never a module of the same name (a reward file called json.py), nor another folder's
            # file of the same name.
            unique = f"_llmft_reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
            loader = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[unique] = module  # dataclasses and pickling look their module up there
            try:
                loader.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(unique, None)
                raise
        else:
            if str(Path.cwd()) not in sys.path:  # the current folder, after installed packages (never shadowing them)
                sys.path.append(str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why
        raise ValueError(f"importing {module_name} failed: {type(err).__name__}: {err}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{module_name} has no function '{name}'.")
    return function


def _checked(function: Callable, spec: str) -> Callable:
    """The reward, its failures and its values checked and named; async where the function is (TRL awaits async
    rewards together, on its own event loop)."""
    def raised(err, ids, failing: str) -> RewardError:
        return RewardError(f"reward '{spec}' raised {type(err).__name__}: {err} (on a batch holding {_first(ids)}"
                           f"{failing}). Fix the reward function or that example.")

    def checked(values, completions, ids) -> list:
        values = list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward '{spec}' returned {len(values)} values for {len(completions)} completions "
                              f"(a batch holding {_first(ids)}): it must return one per completion.")
        for value, example in zip(values, ids):
            if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise RewardError(f"reward '{spec}' returned {value!r} for {example}: rewards must be finite "
                                  "numbers (or None where the reward does not apply).")
        return values

    if inspect.iscoroutinefunction(function):
        async def reward(prompts, completions, **kwargs):
            ids = _ids(completions, kwargs)
            try:
                values = await function(prompts=prompts, completions=completions, **kwargs)
            except Exception as err:
                failing = ""
                for i, one in _one_at_a_time(prompts, completions, kwargs):
                    try:
                        await function(**one)
                    except Exception:
                        failing = f"; it fails on {ids[i]}"
                        break
                raise raised(err, ids, failing) from err
            return checked(values, completions, ids)
    else:
        def reward(prompts, completions, **kwargs):
            ids = _ids(completions, kwargs)
            try:
                values = function(prompts=prompts, completions=completions, **kwargs)
            except Exception as err:
                raise raised(err, ids, _failing(function, prompts, completions, kwargs, ids)) from err
            return checked(values, completions, ids)

    reward.__name__ = reward_name(spec)
    return reward


def _ids(completions, kwargs) -> list[str]:
    return kwargs.get("example_id") or [f"completion {i + 1}" for i in range(len(completions))]


def reward_name(spec: str) -> str:
    """The name TRL logs a reward under (rewards/NAME/mean): exact_match_gsm8k, format, length_256, FUNCTION."""
    kind, _, arg = spec.partition(":")
    if kind == "python":
        return spec.rsplit(":", 1)[-1]
    if kind == "format" or not arg:
        return kind
    return f"{kind}_{re.sub(r'[^A-Za-z0-9]+', '_', arg)[:24].strip('_')}"


def _first(ids: list[str]) -> str:
    unique = list(dict.fromkeys(ids))
    return ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")


def _one_at_a_time(prompts, completions, kwargs):
    """(index, the reward's arguments for that completion alone) for each completion of a batch."""
    columns = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completions)}
    for i in range(len(completions)):
        yield i, {**kwargs, **{k: v[i: i + 1] for k, v in columns.items()}, "prompts": prompts[i: i + 1],
                  "completions": completions[i: i + 1]}


def _failing(function, prompts, completions, kwargs, ids) -> str:
    """The first example the reward raises on alone, so the error can name it."""
    for i, one in _one_at_a_time(prompts, completions, kwargs):
        try:
            function(**one)
        except Exception:
            return f"; it fails on {ids[i]}"
    return ""


def build_rewards(specs: list[str]) -> list[Callable]:
    """The recipe's rewards, each under its own name (TRL logs by name: two formats would share one line)."""
    rewards, seen = [], {}
    for spec in specs:
        reward = build_reward(spec)
        seen[reward.__name__] = seen.get(reward.__name__, 0) + 1
        if seen[reward.__name__] > 1:
            reward.__name__ = f"{reward.__name__}_{seen[reward.__name__]}"
        rewards.append(reward)
    return rewards
