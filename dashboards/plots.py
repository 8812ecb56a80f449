"""The report's pictures: matplotlib figures rendered as inline SVG, plus the per-token KL view as HTML.

Every figure carries its own title, axis labels and legend so it reads on its own when copied out of the
report. SVG text stays text (`svg.fonttype = none`), so titles and legends are searchable in the page.
The training-curve panels are defined once (`CURVE_PANELS`): the report overlays branches in them
(`plot_training_curves`), and the distill step draws one branch's in a single PNG for its card and MLflow run
(`training_curves_png`).
"""

from __future__ import annotations

import html
import io

import matplotlib

matplotlib.use("Agg")  # no display: the report is built in flow steps and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import Normalize, to_hex  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dashboards.runs import BranchRun  # noqa: E402
from pcsd_core import metric_names as names  # noqa: E402
from steps.contract import eval_metric  # noqa: E402

plt.rcParams["svg.fonttype"] = "none"
KL_COLORMAP = "YlOrRd"
# (figure title, y label, [(metric name, legend suffix, line style)]) per training-curve panel; every metric
# is one of the contract's CURVE_METRICS.
CURVE_PANELS = (
    ("Training loss", "loss", [(names.TRAIN_LOSS, "", "-")]),
    ("KL(teacher || student) per response token", "KL (nats)", [(names.TRAIN_KL, "", "-")]),
    (
        "Teacher vs student entropy",
        "entropy (nats)",
        [(names.TRAIN_TEACHER_ENTROPY, " teacher", "-"), (names.TRAIN_STUDENT_ENTROPY, " student", "--")],
    ),
    ("Mean response length", "tokens", [(names.TRAIN_RESPONSE_LEN, "", "-")]),
    ("Rollout accuracy (training prompts)", "strict accuracy", [(names.ROLLOUT_ACCURACY, "", "-")]),
    ("Training throughput", "tokens / s", [(names.PERF_TOKENS_PER_S, "", "-")]),
    # Collapse diagnostics beside the length and entropy panels above (`pcsd_core.eval.collapse`).
    ("Looping rollouts (training prompts)", "share of responses", [(names.ROLLOUT_REPETITION_RATE, "", "-")]),
    ("Loss share of the top 10% of tokens", "share of the step's loss",
     [(names.TRAIN_LOSS_SHARE_TOP10PCT_TOKENS, "", "-")]),
)
EVAL_SERIES = (
    (eval_metric("before", "gsm8k_accuracy_strict"), "strict, before", "#9ecae1", ""),
    (eval_metric("after", "gsm8k_accuracy_strict"), "strict, after", "#3182bd", ""),
    (eval_metric("before", "gsm8k_accuracy_flexible"), "flexible, before", "#fdd0a2", "//"),
    (eval_metric("after", "gsm8k_accuracy_flexible"), "flexible, after", "#e6550d", "//"),
)


def figure_to_svg(fig) -> str:
    """The figure as an `<svg>` element (no XML prolog), ready to inline in HTML."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def branch_tick_label(branch: BranchRun, varying_params: list[str]) -> str:
    """`lr=1e-05\\ndivergence=forward_kl` from the varying params, else the branch name."""
    if not varying_params:
        return branch.name
    return "\n".join(f"{key.split('.')[-1]}={branch.params.get(key, '?')}" for key in varying_params)


def plot_eval_accuracy(branches: list[BranchRun], varying_params: list[str]) -> str:
    """Grouped bars: GSM8K accuracy strict/flexible, before/after, for each branch's hyperparameters."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(branches) + 3), 4.2))
    width = 0.8 / len(EVAL_SERIES)
    for offset, (metric, label, color, hatch) in enumerate(EVAL_SERIES):
        xs = [i + (offset - 1.5) * width for i in range(len(branches))]
        values = [branch.metrics.get(metric, float("nan")) for branch in branches]
        ax.bar(xs, values, width, label=label, color=color, hatch=hatch, edgecolor="#444444", linewidth=0.5)
    ax.set_xticks(range(len(branches)), [branch_tick_label(b, varying_params) for b in branches], fontsize=8)
    swept = ", ".join(varying_params) if varying_params else "branch (no hyperparameter varies)"
    ax.set_xlabel(f"sweep branch ({swept})")
    ax.set_ylabel("GSM8K accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("GSM8K accuracy before vs after distillation, per sweep branch")
    ax.legend(title="scoring, checkpoint", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return figure_to_svg(fig)


def _panels_with_data(branches: list[BranchRun]) -> list[tuple[str, str, list]]:
    return [panel for panel in CURVE_PANELS
            if any(metric in branch.curves for branch in branches for metric, _, _ in panel[2])]


def _draw_curve_panel(ax, branches: list[BranchRun], title: str, ylabel: str, series: list, legend: bool) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, branch in enumerate(branches):
        for metric, suffix, style in series:
            points = branch.curves.get(metric)
            if points:
                steps, values = zip(*points)
                color = colors[index % len(colors)]
                ax.plot(steps, values, style, marker="o", markersize=3, color=color, label=branch.name + suffix)
    ax.set_title(title, fontsize=9 if not legend else None)
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)  # absolute values, not "+1.07e1" offsets
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(title="branch", fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_training_curves(branches: list[BranchRun]) -> list[tuple[str, str]]:
    """One SVG per training-curve panel, branches overlaid; panels with no data are left out."""
    figures = []
    for title, ylabel, series in _panels_with_data(branches):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _draw_curve_panel(ax, branches, title, ylabel, series, legend=True)
        figures.append((title, figure_to_svg(fig)))
    return figures


def training_curves_png(history: list[dict[str, float]], title: str = "") -> bytes:
    """One branch's training-curve panels side by side, as PNG bytes (cards and the branch's MLflow run).

    `history` is the trainer's per-step metrics (a row per step, `step` optional: the row number otherwise).
    """
    curves = {}
    for name in {metric for _, _, series in CURVE_PANELS for metric, _, _ in series}:
        points = [(row.get("step", index + 1), row[name]) for index, row in enumerate(history) if name in row]
        if points:
            curves[name] = points
    branch = BranchRun(run_id="", name=title, status="", params={}, metrics={}, curves=curves)
    panels = _panels_with_data([branch]) or [CURVE_PANELS[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (panel_title, ylabel, series) in zip(axes[0], panels):
        _draw_curve_panel(ax, [branch], panel_title, ylabel, series, legend=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def kl_colour_scale(max_kl: float) -> tuple[Normalize, object]:
    """The shared normalisation and colormap of the per-token view and its colour legend."""
    return Normalize(vmin=0.0, vmax=max(max_kl, 1e-6)), colormaps[KL_COLORMAP]


def plot_kl_colour_legend(max_kl: float) -> str:
    """A horizontal colour bar that maps a token's background colour to its KL."""
    norm, cmap = kl_colour_scale(max_kl)
    fig, ax = plt.subplots(figsize=(6.4, 1.1))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=ax, orientation="horizontal")
    ax.set_title("Colour legend: per-token KL(teacher || student)", fontsize=9)
    ax.set_xlabel("KL of the response token (nats); darker = teacher and student disagree more", fontsize=8)
    return figure_to_svg(fig)


def render_token_kl(example: dict) -> str:
    """The response as coloured `<span>`s, one per token, background = its KL, hover = exact value."""
    tokens, token_kl = example["tokens"], example["token_kl"]
    if len(tokens) != len(token_kl):
        raise ValueError(
            f"samples example has {len(tokens)} tokens but {len(token_kl)} token_kl values; "
            "the trainer must write one KL per response token."
        )
    norm, cmap = kl_colour_scale(max(token_kl, default=0.0))
    spans = []
    for position, (token, kl) in enumerate(zip(tokens, token_kl)):
        shade = norm(kl)
        text_color = "#ffffff" if shade > 0.6 else "#000000"  # keep dark tokens readable
        spans.append(
            f'<span class="tok" data-kl="{kl:.6g}" title="token {position}: KL={kl:.4f}" '
            f'style="background:{to_hex(cmap(shade))};color:{text_color}">{html.escape(token)}</span>'
        )
    return "".join(spans)
