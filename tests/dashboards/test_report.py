"""The HTML report over a store filled by the real MLflow client: self-contained, every plot labelled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib.colors import to_rgb
from mlflow.tracking import MlflowClient

from dashboards.report import PAIRED_COLUMNS, build_report
from dashboards.runs import find_varying_params, load_sweep
from steps.finish import log_report_to_mlflow
from dashboard_store import BRANCHES, EVAL, FLOW_RUN_ID, SAMPLE_KL, SAMPLE_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[2]
BRANCH_NAMES = list(BRANCHES)


class ReportParser(HTMLParser):
    """Collects external links, the text of each <figure> (SVG text included) and the token spans."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.figures: dict[str, list[str]] = {}
        self.tokens: list[tuple[str, float, str]] = []  # (text, data-kl, background colour)
        self.rows: list[tuple[str, list[str]]] = []  # (row class, cell texts)
        self.tables: dict[str, list[list[str]]] = {}  # table id -> its rows' cell texts, header first
        self._table: str | None = None
        self._figure: str | None = None
        self._token: dict | None = None
        self._row: tuple[str, list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[name] for name in ("src", "href", "xlink:href") if attrs.get(name)]
        if tag == "figure":
            self._figure = attrs.get("id") or f"figure{len(self.figures)}"
            self.figures[self._figure] = []
        elif tag == "span" and "tok" in (attrs.get("class") or "").split():
            background = attrs["style"].split("background:")[1].split(";")[0]
            self._token = {"text": "", "kl": float(attrs["data-kl"]), "background": background}
        elif tag == "table":
            self._table = attrs.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._row is None and self._figure is None:
            self._row = (attrs.get("class") or "", [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif self._token is not None:
            raise AssertionError(f"token text must be plain text, found a <{tag}> tag inside a token span")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        elif tag == "span" and self._token is not None:
            self.tokens.append((self._token["text"], self._token["kl"], self._token["background"]))
            self._token = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            if self._table is not None:
                self.tables[self._table].append(self._row[1])
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._figure is not None and data.strip():
            self.figures[self._figure].append(data.strip())
        if self._token is not None:
            self._token["text"] += data
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(filled_store, tmp_path_factory) -> tuple[Path, ReportParser]:
    uri, _ = filled_store
    path = build_report(uri, experiment="pcsd", output_path=tmp_path_factory.mktemp("report") / "report.html")
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return path, parser


def _figure_with_title(parser: ReportParser, title: str) -> list[str]:
    matches = [texts for texts in parser.figures.values() if title in texts]
    assert len(matches) == 1, f"expected one figure titled {title!r}; figure texts: {list(parser.figures.values())}"
    return matches[0]


def test_report_is_self_contained(report):
    path, parser = report
    assert path.is_file() and path.stat().st_size > 10_000
    # In-page anchors and data: URIs (the colour bar is an embedded PNG) are inside the file; nothing else is.
    external = [link for link in parser.links if not link.startswith(("#", "data:"))]
    assert external == [], f"the report must not load anything from outside the file: {external}"


def test_eval_plot_has_title_axes_legend_and_swept_params(report):
    _, parser = report
    texts = _figure_with_title(parser, "GSM8K accuracy before vs after distillation, per sweep branch")
    assert "GSM8K accuracy" in texts
    assert "sweep branch (loss.divergence, train.lr)" in texts
    for entry in ("strict, before", "strict, after", "flexible, before", "flexible, after"):
        assert entry in texts
    # Tick labels show each branch's swept values.
    for label in ("divergence=forward_kl", "lr=1e-05", "divergence=reverse_kl", "lr=0.0001"):
        assert label in texts


@pytest.mark.parametrize(
    "title, ylabel, suffixes",
    [
        ("Training loss", "loss", [""]),
        ("KL(teacher || student) per response token", "KL (nats)", [""]),
        ("Teacher vs student entropy", "entropy (nats)", [" teacher", " student"]),
        ("Mean response length", "tokens", [""]),
        ("Training throughput", "tokens / s", [""]),
        ("Looping rollouts (training prompts)", "share of responses", [""]),
        ("Loss share of the top 10% of tokens", "share of the step's loss", [""]),
    ],
)
def test_training_curves_overlay_every_branch(report, title, ylabel, suffixes):
    _, parser = report
    texts = _figure_with_title(parser, title)
    assert "training step" in texts and ylabel in texts and "branch" in texts
    for name in BRANCH_NAMES:
        for suffix in suffixes:
            assert name + suffix in texts, f"legend of {title!r} lacks {name + suffix!r}: {texts}"


def test_token_view_colours_each_token_by_its_kl(report):
    _, parser = report
    assert [text for text, _, _ in parser.tokens] == SAMPLE_TOKENS  # " <b>" stays text, escaped
    assert [kl for _, kl, _ in parser.tokens] == pytest.approx(SAMPLE_KL, rel=1e-5)

    def darkness(colour: str) -> float:
        return 1.0 - sum(to_rgb(colour)) / 3

    # Darker background for larger KL: the colour order follows the KL order exactly.
    by_kl = sorted(parser.tokens, key=lambda token: token[1])
    assert [darkness(bg) for _, _, bg in by_kl] == sorted(darkness(bg) for _, _, bg in by_kl)
    assert darkness(by_kl[-1][2]) > darkness(by_kl[0][2]) + 0.5
    legend = _figure_with_title(parser, "Colour legend: per-token KL(teacher || student)")
    assert "KL of the response token (nats); darker = teacher and student disagree more" in legend


def test_branch_table_marks_the_best_branch(report):
    _, parser = report
    paired_row_width = 2 + len(PAIRED_COLUMNS)  # the paired-tests table's rows also start with a branch name
    body = [(row_class, cells) for row_class, cells in parser.rows
            if cells[0] != "branch" and len(cells) > paired_row_width]  # fmt: skip
    assert len(body) == len(BRANCHES)
    best_name = max(EVAL, key=lambda name: (EVAL[name]["after_strict"], EVAL[name]["after_flex"]))
    best_rows = [cells for row_class, cells in body if row_class == "best"]
    assert len(best_rows) == 1 and best_rows[0][0] == f"{best_name} ★ best"


def test_sweep_is_found_by_flow_run_by_parent_and_as_latest(filled_store):
    uri, ids = filled_store
    client = MlflowClient(uri)
    by_flow = load_sweep(client, "pcsd", flow_run_id=FLOW_RUN_ID)
    by_parent = load_sweep(client, "pcsd", parent_run_id=ids["parent"])
    latest = load_sweep(client, "pcsd")
    for sweep in (by_flow, by_parent, latest):
        assert sweep.parent_run_id == ids["parent"]
        assert [branch.name for branch in sweep.branches] == BRANCH_NAMES
        assert [branch.run_id for branch in sweep.branches] == [ids[name] for name in BRANCH_NAMES]
    # train.output_dir differs per branch but is not a hyperparameter.
    assert find_varying_params(latest.branches) == ["loss.divergence", "train.lr"]
    assert [value for _, value in latest.branches[1].curves["train/loss"]] == pytest.approx([2.0, 1.0, 2.0 / 3])


def test_bad_filters_raise_clear_errors(filled_store, tmp_path):
    uri, _ = filled_store
    with pytest.raises(ValueError, match=r"experiment \('nope'\) does not exist.*'pcsd'"):
        build_report(uri, experiment="nope", output_path=tmp_path / "r.html")
    with pytest.raises(ValueError, match="pcsd.flow_run_id='999'"):
        build_report(uri, flow_run_id="999", output_path=tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_latest_builds_the_report(filled_store, tmp_path):
    uri, _ = filled_store
    output = tmp_path / "cli.html"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run(
        [sys.executable, "-m", "dashboards.report", "--latest", "--output", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(output.resolve())
    assert f"PCSD sweep report: pcsd-{FLOW_RUN_ID}" in output.read_text(encoding="utf-8")


def test_report_is_logged_under_the_parent_runs_report_folder(filled_store, report, tmp_path):
    uri, ids = filled_store
    path, _ = report
    artifact = log_report_to_mlflow(ids["parent"], path, tracking_uri=uri)
    assert artifact == "report/report.html"
    client = MlflowClient(uri)
    assert [f.path for f in client.list_artifacts(ids["parent"], "report")] == [artifact]
    local = client.download_artifacts(ids["parent"], artifact, str(tmp_path))
    assert Path(local).read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="is not a file"):
        log_report_to_mlflow(ids["parent"], tmp_path / "missing.html", tracking_uri=uri)


def test_unevaluated_branch_without_samples_still_reports(tmp_path):
    """A branch that failed before evaluation: no best is claimed, and the page says why a view is missing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("pcsd", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="pcsd-7", tags={"pcsd.flow_run_id": "7"})
    child = client.create_run(
        experiment_id, run_name="lr=1e-05", tags={"mlflow.parentRunId": parent.info.run_id, "pcsd.branch": "lr=1e-05"}
    )
    for step in (1, 2):
        client.log_metric(child.info.run_id, "train/loss", 1.0 / step, step=step)
    client.set_terminated(child.info.run_id, "FAILED")
    page = build_report(uri, flow_run_id="7", output_path=tmp_path / "r.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(page)
    assert [cells[0] for _, cells in parser.rows] == ["branch", "lr=1e-05"]
    assert [row_class for row_class, _ in parser.rows] == ["", ""]  # nothing marked best
    assert "No samples/step_*.jsonl artifact was found" in page
    assert "lr=1e-05" in _figure_with_title(parser, "Training loss")
    assert [title for title in ("Training loss", "Mean response length") if title in page] == ["Training loss"]


def _numbers(cell: str) -> list[float]:
    return [float(text) for text in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell)]


def test_collapse_table_shows_each_diagnostic_at_the_first_and_last_step(report):
    from dashboard_store import _train_metrics
    from dashboards.report import COLLAPSE_COLUMNS
    from pcsd_core.metric_names import COLLAPSE_METRICS

    _, parser = report
    table = parser.tables["collapse-table"]
    assert table[0] == ["branch", *(label for _, label in COLLAPSE_COLUMNS)]
    assert [name for name, _ in COLLAPSE_COLUMNS] == list(COLLAPSE_METRICS)
    assert [row[0] for row in table[1:]] == BRANCH_NAMES
    for index, row in enumerate(table[1:]):
        first = {m.key: m.value for m in _train_metrics(index, 1)}
        last = {m.key: m.value for m in _train_metrics(index, 3)}  # the store logs steps 1, 2, 3
        for cell, name in zip(row[1:], COLLAPSE_METRICS):
            assert "→" in cell and _numbers(cell) == pytest.approx([first[name], last[name]], rel=1e-3), (name, cell)
    # No train.seed axis in this sweep: no "Arms over seeds" section.
    assert "seed-groups" not in parser.tables


def test_arms_over_seeds_table_gives_each_arms_mean_and_t_interval(tmp_path):
    """A sweep over privileged context x seed: one row per arm, in first-seen order, beside the paired tests; the
    mean and Student-t 95% interval over seeds from a t table (df = 1: 12.706, df = 2: 4.303)."""
    import json

    t_table = {1: 12.706, 2: 4.303}

    def t_interval(values: list[float]) -> list[float]:
        n, mean = len(values), sum(values) / len(values)
        half = t_table[n - 1] * (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 / n**0.5
        return [mean, mean - half, mean + half]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("pcsd", artifact_location=(tmp_path / "artifacts").as_uri())
    grid = {"data.privileged_context": ["solution", "shuffled"], "train.seed": [0, 1, 2]}
    parent = client.create_run(experiment_id, run_name="pcsd-8", tags={"pcsd.flow_run_id": "8"})
    client.log_param(parent.info.run_id, "sweep", json.dumps(grid))
    before = 0.25
    after = {("solution", 0): 0.30, ("shuffled", 0): 0.20, ("solution", 1): 0.45, ("shuffled", 1): 0.25,
             ("solution", 2): 0.36, ("shuffled", 2): None}  # the last branch failed before its evaluation
    for (context, seed), value in after.items():
        label = f"privileged_context={context},seed={seed}"
        run = client.create_run(experiment_id, run_name=label,
                                tags={"mlflow.parentRunId": parent.info.run_id, "pcsd.branch": label})
        client.log_param(run.info.run_id, "data.privileged_context", context)
        client.log_param(run.info.run_id, "train.seed", str(seed))
        client.log_param(run.info.run_id, "train.output_dir", f"outputs/{context}-{seed}")
        if value is not None:
            client.log_metric(run.info.run_id, "eval/before/gsm8k_accuracy_strict", before)
            client.log_metric(run.info.run_id, "eval/after/gsm8k_accuracy_strict", value)
            client.log_metric(run.info.run_id, "eval/delta/gsm8k_accuracy_strict", value - before)
        client.set_terminated(run.info.run_id, "FINISHED" if value is not None else "FAILED")
    page = build_report(uri, flow_run_id="8", output_path=tmp_path / "r.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(page)
    header, *rows = parser.tables["seed-groups"]
    assert header[:2] == ["arm", "seeds"]
    assert [row[:2] for row in rows] == [["privileged_context=solution", "0, 1, 2"], ["privileged_context=shuffled", "0, 1"]]
    for row, values in zip(rows, ([0.30, 0.45, 0.36], [0.20, 0.25])):
        assert _numbers(row[2]) == pytest.approx(t_interval(values), rel=2e-3, abs=1e-3)
        assert _numbers(row[3]) == pytest.approx(t_interval([v - before for v in values]), rel=2e-3, abs=1e-3)
    # Placed right after the paired tests between branches.
    assert page.index('id="paired"') < page.index('id="seeds"') < page.index('id="eval"')
