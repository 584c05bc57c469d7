"""`llmft report RUN [RUN ...]`: one self-contained HTML page to judge a run by looking, or to compare several.

Read from run directories only (llmft.run_dir): curves from trainer_state.json, before/after metrics, samples, the
data as training tokenised it, speed and memory from run.json, the recipe. Charts are Plotly figures with Plotly's
own JavaScript bundle inlined once, so the page works from disk, offline and inside a Hub repository.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmft import run_dir
from llmft.errors import ConfigError
from llmft.run_dir import Run

log = logging.getLogger(__name__)

# Logged values that are bookkeeping, not results: left out of the metric charts.
NOT_CHARTED = ("runtime", "per_second", "model_preparation_time", "num_tokens", "epoch", "step", "total_flos")
# Dense bf16 peak TFLOP/s by GPU name (vendor data sheets), for MFU; a GPU not listed gets no MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


@dataclass
class ReportOptions:
    runs: list[str] = field(metadata={"positional": True, "metavar": "RUN", "help": "Run directories (several: "
                                                                                   "side by side)."})
    out: str | None = field(default=None, metadata={"help": "The HTML file, or a folder for it (default: "
                                                            "RUN/report.html for one run, report.html for several)."})

    def __post_init__(self):
        if not self.runs:
            raise ConfigError(["give at least one run directory."], what="the options of llmft report")


def report_command(options: ReportOptions) -> None:
    runs = [run_dir.read_run(Path(path)) for path in options.runs]
    default = runs[0].path / run_dir.REPORT_FILE if len(runs) == 1 else Path(run_dir.REPORT_FILE)
    out = Path(options.out) if options.out else default
    if out.is_dir():  # a folder, as other commands' --out: the page goes in it
        out = out / run_dir.REPORT_FILE
    print(f"report: {write_report(runs, out)}")


def write_report(runs: list[Run], out: Path) -> Path:
    """The page for one run or several, written to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs), encoding="utf-8")
    return out


def refresh(path: Path) -> Path | None:
    """RUN/report.html written anew (after training and after llmft eval); a failure is logged, never raised: the
    run itself is complete without its page."""
    try:
        return write_report([run_dir.read_run(path)], path / run_dir.REPORT_FILE)
    except Exception as err:  # any: a page that cannot be drawn must not fail a finished run
        log.warning("Could not write %s: %s: %s (llmft report %s retries and shows the error)",
                    path / run_dir.REPORT_FILE, type(err).__name__, err, path)
        return None


# The page -------------------------------------------------------------------------------------------------------


def render(runs: list[Run]) -> str:
    from plotly.offline import get_plotlyjs

    charts = Charts()
    title = runs[0].path.name if len(runs) == 1 else f"{len(runs)} runs"
    body = [f"<h1>llmft report: {_e(title)}</h1>"]
    if len(runs) > 1:
        body += comparison(runs, charts)
    for run in runs:
        body.append(run_section(run, charts, open_=len(runs) == 1))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>{''.join(body)}"
            f"<script>{charts.script()}{FILTER_JS}</script></body></html>")


def run_section(run: Run, charts: Charts, open_: bool = True) -> str:
    history = _history(run)
    parts = [overview(run), metrics_section(run), curves(run, history, charts), samples_section(run),
             data_section(run, charts), speed_section(run, history), recipe_section(run)]
    return (f"<details class='run' {'open' if open_ else ''}><summary>{_e(str(run.path))} "
            f"<span class='stage'>{_e(run.info.stage)}, {_e(run.recipe.peft.method)}</span></summary>"
            f"{''.join(p for p in parts if p)}</details>")


def overview(run: Run) -> str:
    info, recipe = run.info, run.recipe
    rows = [("base model", info.base_model.name_or_path), ("stage", info.stage), ("method", recipe.peft.method),
            ("trainable parameters", f"{info.trainable_parameters:,} of {info.total_parameters:,}"),
            ("global batch", info.launch.global_batch_size), ("processes", info.launch.world_size),
            ("wall time", _duration(info.seconds)), ("resumed from", info.resumed_from or "-"),
            ("git", info.git_sha or "-")]
    return "<h2>Overview</h2>" + _table(["", ""], rows, cls="kv")


def metrics_section(run: Run) -> str:
    before, after = run.metrics.before or {}, run.metrics.after or {}
    keys = _metric_keys({**before, **after})
    if not keys:
        return ""
    rows = []
    for key in keys:
        b, a = before.get(key), after.get(key)
        delta = f"{a - b:+.4f}" if _num(a) and _num(b) else "-"
        rows.append((key, _fmt(b), _fmt(a), delta, _verdict(key, b, a)))
    html_ = "<h2>Before and after training</h2>" + _table(["metric", "before", "after", "delta", ""], rows)
    results = run.eval_results()
    if results:  # llmft eval, possibly with other settings or a judge
        base = results.get("baseline") or {}
        rows = [(k, _fmt(base.get(k)), _fmt(v)) for k, v in results["results"].items() if _num(v)]
        html_ += (f"<h3>llmft eval ({_e(results.get('data', ''))})</h3>"
                  + _table(["metric", f"baseline {results.get('baseline_model') or ''}", "run"], rows))
    return html_


def curves(run: Run, history: list[dict[str, Any]], charts: Charts) -> str:
    """Loss, each eval metric, learning rate, grad norm and rewards against the step, switchable to tokens seen."""
    tokens = _tokens_by_step(run, history)
    markers = events(run, history)
    html_ = ["<h2>Training curves</h2>", f"<p class='note'>Markers: {_e(_describe(markers)) or 'none'}.</p>"]
    series = {"loss": [("train loss", _points(history, "loss", train=True)),
                       ("eval loss", _with_before(run, "eval_loss", _points(history, "eval_loss")))]}
    for key in _metric_keys({k for h in history for k in h}):
        if key != "eval_loss":
            series[key] = [(key, _with_before(run, key, _points(history, key)))]
    series["learning rate"] = [("learning rate", _points(history, "learning_rate", train=True))]
    series["grad norm"] = [("grad norm", _points(history, "grad_norm", train=True))]
    rewards = sorted({k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    if rewards:
        series["reward"] = [("total (weighted)" if k == "reward" else k.split("/")[1], _points(history, k, train=True))
                            for k in ["reward", *rewards]]
    for name, lines in series.items():
        lines = [(label, pts) for label, pts in lines if pts]
        if lines:
            html_.append(charts.line(name, lines, tokens, markers))
    return "".join(html_)


def samples_section(run: Run) -> str:
    path = run.path / run_dir.SAMPLES_FILE
    if path.exists():
        samples = run_dir.read_jsonl(path)
    else:  # a run trained without generation, answered later by llmft eval
        samples = (run.eval_results() or {}).get("samples") or []
    if not samples:
        return ""
    has_base = any("baseline_answer" in s for s in samples)
    head = ["prompt", "reference", *(["base answer"] if has_base else []), "tuned answer"]
    rows = []
    for s in samples:
        status = _status(s)
        cells = [s.get("prompt", ""), s.get("reference", ""), *([s.get("baseline_answer", "")] if has_base else []),
                 s.get("answer", "")]
        rows.append(f"<tr data-status='{status}'>" + "".join(f"<td>{_e(str(c))}</td>" for c in cells) + "</tr>")
    counts = {k: sum(_status(s) == k for s in samples) for k in ("fixed", "broken", "right", "wrong")}
    options = "".join(f"<option value='{k}'>{k} ({n})</option>" for k, n in counts.items() if n)
    return (f"<h2>Samples ({len(samples)} held-out prompts)</h2><div class='filter'>"
            "<input type='search' class='sample-filter' placeholder='filter: any text in the row'> "
            f"<select class='sample-status'><option value=''>all</option>{options}</select> "
            "<span class='shown'></span></div><div class='scroll'><table class='samples'><thead><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def data_section(run: Run, charts: Charts) -> str:
    html_ = ["<h2>Data</h2>"]
    rows = []
    for split, record in run.info.data.items():
        if record is None:
            continue
        t = record.tokenized or {}
        dropped = "; ".join(f"{n} {why}" for why, n in (t.get("dropped") or {}).items()) or "-"
        share = f"{t['trainable_tokens'] / t['tokens']:.0%}" if t.get("tokens") else "-"
        rows.append((split, record.path, t.get("rows_in", "-"), t.get("rows_out", "-"), t.get("examples", "-"),
                     t.get("truncated", "-"), dropped, t.get("tokens", "-"), share))
    html_.append(_table(["split", "source", "rows in", "rows kept", "examples", "truncated", "dropped (why)",
                         "tokens", "share in the loss"], rows))
    manifest = _manifest(run)
    if manifest:
        sources = [(s.get("name"), s.get("path"), s.get("format"), s.get("read"), s.get("kept"),
                    "; ".join(f"{n} {why}" for why, n in (s.get("rejected") or {}).items()) or "-")
                   for s in manifest.get("sources", [])]
        html_.append("<h3>Sources (data build manifest)</h3>"
                     + _table(["name", "path", "format", "rows read", "kept", "rejected (why)"], sources))
        steps = [(name, json.dumps(value)[:200]) for name, value in manifest.get("steps", {}).items()]
        html_.append(_table(["build step", "counts"], steps))
    histogram = ((run.info.data.get("train") or run_dir.DataRecord("", "", 0, 0)).tokenized or {}).get("length_histogram")
    if histogram:
        html_.append(charts.histogram("train example length (tokens)", histogram))
    return "".join(html_)


def speed_section(run: Run, history: list[dict[str, Any]]) -> str:
    train, hw = run.metrics.train, run.info.hardware
    tokens = _tokens_by_step(run, history)
    seen = max(tokens.values()) if tokens else None
    runtime = train.get("train_runtime")
    # The Trainer's own rate covers this session only, as its runtime does (a resumed run counts from its resume).
    rate = train.get("train_tokens_per_second") or (seen / runtime if seen and runtime else None)
    rows = [("training time", _duration(runtime)), ("whole run (load, evaluate, save)", _duration(run.info.seconds)),
            ("tokens trained on", f"{seen:,.0f}" if seen else "-"), ("tokens/s", f"{rate:,.0f}" if rate else "-"),
            ("peak memory (process RSS)", _mb(hw.get("peak_rss_mb")))]
    if hw.get("gpu"):
        rows.append(("peak GPU memory", _mb(hw.get("peak_gpu_memory_mb"))))
    mfu = _mfu(run, rate)
    rows.append(("MFU", f"{mfu:.1%}" if mfu is not None else "- (the hardware's peak is not known)"))
    rows += [("hardware", f"{hw.get('gpu') or hw.get('processor') or hw.get('platform', '-')}, "
                          f"{hw.get('gpu_count', 0)} GPU(s), {hw.get('cpus', '-')} CPUs, "
                          f"{hw.get('torch_threads', '-')} torch threads"),
             ("versions", ", ".join(f"{k} {v}" for k, v in run.info.versions.items() if v))]
    return "<h2>Speed and cost</h2>" + _table(["", ""], rows, cls="kv")


def recipe_section(run: Run) -> str:
    text = yaml.safe_dump(run.recipe.to_dict(), sort_keys=False)
    return f"<h2>Recipe</h2><pre class='recipe'>{_e(text)}</pre>"


def comparison(runs: list[Run], charts: Charts) -> list[str]:
    """Several runs: their after-training metrics side by side, the recipe keys that differ, loss curves overlaid."""
    names = [_label(run, runs) for run in runs]
    afters = [run.metrics.after or {} for run in runs]
    keys = _metric_keys({k for a in afters for k in a})
    rows = [(k, *[_fmt(a.get(k)) for a in afters]) for k in keys]
    rows.append(("tokens/s", *[_rate(run) for run in runs]))
    rows.append(("peak memory", *[_mb(run.info.hardware.get("peak_rss_mb")) for run in runs]))
    flat = [_flatten(run.recipe.to_dict()) for run in runs]
    differ = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), default=str) for f in flat}) > 1)
    diff_rows = [(k, *[json.dumps(f.get(k), default=str) for f in flat]) for k in differ]
    lines = [(f"{name} {label}", pts) for name, run in zip(names, runs) for label, pts in (
        ("train", _points(_history(run), "loss", train=True)),
        ("eval", _with_before(run, "eval_loss", _points(_history(run), "eval_loss")))) if pts]
    return ["<h2>Side by side</h2>", _table(["metric", *names], rows),
            "<h3>Recipe differences</h3>", _table(["key", *names], diff_rows) if diff_rows else
            "<p>The recipes are the same.</p>", charts.line("loss (all runs)", lines, {}, []) if lines else ""]


# Charts ---------------------------------------------------------------------------------------------------------


class Charts:
    """Plotly figures collected as JSON and drawn by one script at the end of the page."""

    def __init__(self):
        self.figures: list[tuple[str, str]] = []

    def _add(self, fig) -> str:
        div = f"chart-{len(self.figures)}"
        self.figures.append((div, fig.to_json()))
        return f"<div class='chart' id='{div}'></div>"

    def line(self, title: str, lines: list[tuple[str, list[tuple[int, float]]]], tokens: dict[int, float],
             markers: list[tuple[int, str]]):
        import plotly.graph_objects as go

        fig = go.Figure()
        for label, pts in lines:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label,
                                     mode="lines+markers" if len(pts) < 30 else "lines"))
        for step, what in markers:
            fig.add_vline(x=step, line_dash="dot", line_color=MARKER_COLOURS.get(what, "grey"),
                          annotation_text=what, annotation_font_size=9)
        fig.update_layout(title=title, xaxis_title="step", height=300, margin=dict(l=50, r=20, t=40, b=40),
                          legend=dict(orientation="h", y=-0.25))
        if tokens and all(p[0] in tokens for _, pts in lines for p in pts):
            by_tokens = [[tokens[p[0]] for p in pts] for _, pts in lines]
            by_step = [[p[0] for p in pts] for _, pts in lines]
            shapes = [s.to_plotly_json() for s in fig.layout.shapes]
            notes = [a.to_plotly_json() for a in fig.layout.annotations]
            at = lambda step: tokens[max((s for s in tokens if s <= step), default=0)]  # noqa: E731
            token_shapes = [{**s, "x0": at(s["x0"]), "x1": at(s["x1"])} for s in shapes]
            token_notes = [{**a, "x": at(a["x"])} for a in notes]
            fig.update_layout(updatemenus=[dict(type="buttons", direction="right", x=1, y=1.18, showactive=True,
                                                buttons=[dict(label="step", method="update", args=[
                                                    {"x": by_step}, {"xaxis.title.text": "step", "shapes": shapes,
                                                                     "annotations": notes}]),
                                                         dict(label="tokens seen", method="update", args=[
                                                    {"x": by_tokens}, {"xaxis.title.text": "tokens seen",
                                                                       "shapes": token_shapes,
                                                                       "annotations": token_notes}])])])
        return self._add(fig)

    def histogram(self, title: str, histogram: dict[str, list]):
        import plotly.graph_objects as go

        edges, counts = histogram["edges"], histogram["counts"]
        centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        fig = go.Figure(go.Bar(x=centres, y=counts, width=[b - a for a, b in zip(edges, edges[1:])],
                               name="examples"))
        fig.update_layout(title=title, xaxis_title="tokens", yaxis_title="examples", height=280,
                          margin=dict(l=50, r=20, t=40, b=40))
        return self._add(fig)

    def script(self) -> str:
        calls = "".join(f"(function(){{var f={fig};Plotly.newPlot('{div}',f.data,f.layout,"
                        "{responsive:true,displaylogo:false});})();" for div, fig in self.figures)
        return calls


MARKER_COLOURS = {"checkpoint": "green", "resumed": "blue", "skipped non-finite step": "red", "early stop": "orange"}


def events(run: Run, history: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, what) for checkpoints, the resume point, skipped non-finite steps and an early stop."""
    marks = [(h["step"], "checkpoint") for h in history if h.get("llmft_event") == "checkpoint"]
    if run.info.resumed_from:
        step = run.info.resumed_from.rstrip("/").rsplit("-", 1)[-1]
        if step.isdigit():
            marks.append((int(step), "resumed"))
    marks += [(s["step"], "skipped non-finite step") for s in run.info.skipped_nonfinite_steps if "step" in s]
    state = run_dir.read_json(run.path / run_dir.STATE_FILE)
    if run.recipe.eval.early_stopping_patience is not None and state.get("global_step", 0) < state.get("max_steps", 0):
        marks.append((state["global_step"], "early stop"))
    return sorted(set(marks))


def _describe(markers: list[tuple[int, str]]) -> str:
    return ", ".join(f"{what} at step {step}" for step, what in markers)


# Reading the run ------------------------------------------------------------------------------------------------


def _history(run: Run) -> list[dict[str, Any]]:
    return run_dir.read_json(run.path / run_dir.STATE_FILE).get("log_history", [])


def _points(history: list[dict[str, Any]], key: str, train: bool = False) -> list[tuple[int, float]]:
    """(step, value) of one logged key; `train` leaves out the evaluation entries that share a key name."""
    return [(h["step"], h[key]) for h in history
            if _num(h.get(key)) and "step" in h and not (train and any(k.startswith("eval_") for k in h))]


def _with_before(run: Run, key: str, points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    before = (run.metrics.before or {}).get(key)
    return ([(0, before)] if _num(before) and not any(s == 0 for s, _ in points) else []) + points


def _tokens_by_step(run: Run, history: list[dict[str, Any]]) -> dict[int, float]:
    """Tokens trained on by each logged step: as counted in training where the trainer logs it, else the split's
    token count spread evenly over its steps."""
    counted = {h["step"]: h[k] for h in history for k in ("num_tokens", "num_input_tokens_seen")  # the latter wins
               if _num(h.get(k)) and h.get(k) and not any(x.startswith("eval_") for x in h)}
    steps = sorted({h["step"] for h in history if "step" in h})
    if counted:
        return {0: 0, **counted}
    total = ((run.info.data.get("train") or run_dir.DataRecord("", "", 0, 0)).tokenized or {}).get("tokens")
    epochs, last = run.metrics.train.get("epoch"), max(steps, default=0)
    if not total or not epochs or not last:
        return {}
    per_step = total * epochs / last
    return {s: s * per_step for s in [0, *steps]}


def _manifest(run: Run) -> dict[str, Any] | None:
    path = run.path / run_dir.MANIFEST_COPY
    return run_dir.read_json(path) if path.exists() else None


def _rate(run: Run) -> str:
    tokens = _tokens_by_step(run, _history(run))
    runtime = run.metrics.train.get("train_runtime")
    rate = run.metrics.train.get("train_tokens_per_second") or (max(tokens.values()) / runtime if tokens and runtime
                                                                  else None)
    return f"{rate:,.0f}" if rate else "-"


def _mfu(run: Run, tokens_per_second: float | None) -> float | None:
    """Model FLOPs utilisation on a GPU of known peak: 6 FLOPs per parameter per token for full training, 4 when
    only adapters train (no weight gradients for the frozen matrices)."""
    gpu = run.info.hardware.get("gpu") or ""
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in gpu), None)
    if not peak or not tokens_per_second:
        return None
    per_token = (6 if run.recipe.peft.method == "full" else 4) * run.info.total_parameters
    return tokens_per_second * per_token / (peak * 1e12 * run.info.launch.world_size)


def _metric_keys(keys) -> list[str]:
    """eval_* results worth charting or tabulating, eval_loss first."""
    wanted = [k for k in keys if k.startswith("eval_") and not any(n in k for n in NOT_CHARTED)]
    return sorted(wanted, key=lambda k: (k != "eval_loss", k))


def _status(sample: dict[str, Any]) -> str:
    after, before = sample.get("exact_match"), sample.get("baseline_exact_match")
    if before is not None and after is not None and before != after:
        return "fixed" if after else "broken"
    return "right" if after else "wrong"


class Markup(str):
    """Markup written here, which `_table` leaves as it is; every other cell is escaped."""


HIGHER_IS_BETTER = ("exact_match", "accuracy", "rouge", "bleu", "chrf", "margin", "win_rate", "grade")


def _verdict(key: str, before, after) -> str:
    """better/worse for metrics with a direction; none for the others (entropy, log-probs, rewards of one side)."""
    lower = key in run_dir.LOWER_IS_BETTER or key.endswith("_ppl") or key.endswith("loss")
    if not (_num(before) and _num(after)) or before == after or not (lower or any(
            k in key for k in HIGHER_IS_BETTER)):
        return ""
    better = (after < before) if lower else (after > before)
    return Markup("<span class='good'>better</span>" if better else "<span class='bad'>worse</span>")


def _label(run: Run, runs: list[Run]) -> str:
    names = [r.path.name for r in runs]
    return run.path.name if names.count(run.path.name) == 1 else f"{run.path.parent.name}/{run.path.name}"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# HTML helpers ---------------------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text))


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if _num(value) else "-"


def _mb(value: Any) -> str:
    return f"{value / 1024:.2f} GB" if _num(value) else "-"


def _duration(seconds: Any) -> str:
    if not _num(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def _table(head: list[str], rows: list[tuple], cls: str = "") -> str:
    """Every cell escaped, but the Markup this module wrote (the better/worse verdicts)."""
    def cell(value: Any) -> str:
        return value if isinstance(value, Markup) else _e(value)

    header = "" if not any(head) else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'>{header}<tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}table.kv td:first-child{font-weight:600}
table.samples td{max-width:380px;white-space:pre-wrap;word-break:break-word}
.scroll{max-height:640px;overflow:auto;display:inline-block}
.chart{display:inline-block;width:49%;min-width:420px}.good{color:#080}.bad{color:#b00}.note{color:#666}
details.run>summary{font-size:1.1em;font-weight:600;cursor:pointer}.stage{color:#666;font-weight:400}
pre.recipe{background:#f8f8f8;padding:.8em;overflow:auto;max-height:500px}.filter{margin:.5em 0}
"""

# The samples filter: rows whose text holds every word typed, of the chosen status; counts what is shown.
FILTER_JS = """
document.querySelectorAll('.filter').forEach(function(box){
  var table=box.nextElementSibling.querySelector('table'), input=box.querySelector('.sample-filter'),
      status=box.querySelector('.sample-status'), shown=box.querySelector('.shown');
  function apply(){
    var words=input.value.toLowerCase().split(/\\s+/).filter(Boolean), n=0;
    table.querySelectorAll('tbody tr').forEach(function(tr){
      var text=tr.textContent.toLowerCase();
      var ok=words.every(function(w){return text.indexOf(w)>=0;})&&(!status.value||tr.dataset.status===status.value);
      tr.style.display=ok?'':'none'; if(ok){n++;}
    });
    shown.textContent=n+' shown';
  }
  input.addEventListener('input',apply); status.addEventListener('change',apply); apply();
});
"""
