"""The PCSD experiment flow: preprocess -> evaluate the base model -> distill (one branch per sweep point)
-> evaluate -> join -> register.

    python flows/pcsd_flow.py run                                    # embedded CPU default (SmolLM2-135M)
    python flows/pcsd_flow.py --config config configs/gpu_gsm8k_7b.yaml run --total-steps 200
    python flows/pcsd_flow.py run --sweep '{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}'
    python flows/pcsd_flow.py run --set "rollout.n=4 loss.divergence=jsd"

Settings, highest first: the knob Parameters (--model, --total-steps, --data-path, --lr) > --set > the
reference script's environment variables (MODEL_PATH, DATA_PATH, TOTAL_STEPS, ACTOR_NUM_GPUS,
ROLLOUT_NUM_GPUS) > the YAML preset (`steps/plan.py`).
Every run is tracked in MLflow (MLFLOW_TRACKING_URI, default sqlite:///<repo>/mlflow.db): one parent run,
one nested child run per branch. Look at it with `mlflow ui --backend-store-uri sqlite:///mlflow.db` and
`python flows/pcsd_flow.py card view <step>`. Steps only wire: the work is in `steps/`.
With `train.output_dir` set to a storage URI (s3://, gs://, file://) no step reads another step's disk
(`steps/storage.py`), so `--with kubernetes` / `--with batch` can put each task on its own machine, sized by the
preset's `resources:` (README "Beyond one machine").
"""

from metaflow import Config, FlowSpec, Parameter, card, catch, current, resources, retry, step, timeout

from flows.guard import guarded_step
from steps.plan import FLOW_KNOBS

DISTILL_TIMEOUT_S = 12 * 3600  # a 7B preset on GPUs; a hung Ray worker must not hold the flow forever
CARD_TIMEOUT_S = 300  # card rendering is a subprocess; the default 45 s is too short on a busy 2-core machine
KNOBS = {knob.name: knob for knob in FLOW_KNOBS}
REMOTE_COMPUTE = {"kubernetes", "batch"}  # `--with kubernetes` / `--with batch`: tasks run on other machines


def knob_parameter(name: str) -> Parameter:
    """The flow Parameter of one FLOW_KNOBS row (0 / "" = not given: the env variable or preset decides)."""
    knob = KNOBS[name]
    fallback = f"else {knob.env}, else preset" if knob.env else "else preset"
    return Parameter(name.replace("_", "-"), type=knob.type, default=knob.type(), help=f"{knob.help} ({fallback})")


class PCSDFlow(FlowSpec):
    """Privileged Context Self-Distillation with tracking, sweeps, evaluation and a model registry."""

    config = Config("config", default="configs/cpu_smollm2.yaml", parser="steps.plan.parse_preset")
    model = knob_parameter("model")
    total_steps = knob_parameter("total_steps")
    data_path = knob_parameter("data_path")
    lr = knob_parameter("lr")
    overrides = Parameter("set", default="", help='config overrides, e.g. "train.lr=1e-5 rollout.n=4" (else preset)')
    sweep = Parameter("sweep", default="", help='JSON grid, e.g. \'{"train.lr": [1e-5, 3e-5]}\' (else preset sweep:)')

    @step
    def start(self):
        from steps import tracking
        from steps.plan import plan_run

        with guarded_step("start"):
            knobs = {name: getattr(self, name) for name in KNOBS}
            # The GPU check runs here only when distill runs on this machine; on a compute backend, distill checks.
            distill_here = not any(deco.name in REMOTE_COMPUTE for deco in PCSDFlow.distill.decorators)
            self.plan = plan_run(self.config, flow_run_id=current.run_id, sweep=self.sweep,
                                 overrides=self.overrides, check_machine=distill_here, **knobs)
            self.mlflow_run_id = tracking.start_parent_run(current.run_id, current.pathspec, self.plan.flat_params())
        for sized in (PCSDFlow.distill, PCSDFlow.evaluate):  # what `--with kubernetes` / `--with batch` will ask for
            sizes = next(deco.attributes for deco in sized.decorators if deco.name == "resources")
            print(f"{sized.__name__} tasks ask compute backends for cpu={sizes['cpu']} memory={sizes['memory']} MB "
                  f"gpu={sizes['gpu']} (preset resources:)")
        self.next(self.preprocess)

    @retry(times=1)
    @step
    def preprocess(self):
        from steps.preprocess import preprocess_branches

        with guarded_step("preprocess", self.mlflow_run_id):
            self.branches = preprocess_branches(self.plan, self.mlflow_run_id)
        self.next(self.evaluate_base)

    @retry(times=1)
    @step
    def evaluate_base(self):
        from steps.evaluate import evaluate_base_models

        with guarded_step("evaluate_base", self.mlflow_run_id):  # once per distinct base model, not per branch
            self.base_evaluations = evaluate_base_models(self.branches, self.mlflow_run_id, self.plan.output_root)
        self.next(self.distill, foreach="branches")

    # A dead Ray worker or a lost machine fails the task; the retry continues from its last checkpoint
    # (train.checkpoint_every) in the same MLflow run. Sizes for compute backends come from the preset.
    @card(type="blank", id="training", timeout=CARD_TIMEOUT_S)
    @catch(var="distill_failure")
    @retry(times=1)
    @timeout(seconds=DISTILL_TIMEOUT_S)
    @resources(cpu=config.resources.distill.cpu, memory=config.resources.distill.memory,
               gpu=config.resources.distill.gpu)
    @step
    def distill(self):
        from dashboards.plots import training_curves_png
        from flows.cards import training_card
        from steps.distill import distill

        self.branch = self.input
        with guarded_step("distill", self.mlflow_run_id, branch=True):
            self.trained = distill(self.branch, parent_run_id=self.mlflow_run_id, flow_run_id=current.run_id,
                                   pathspec=current.pathspec, plot_curves=training_curves_png)
        current.card["training"].extend(training_card(self.trained))
        self.next(self.evaluate)

    @catch(var="eval_failure")
    @retry(times=1)
    @resources(cpu=config.resources.evaluate.cpu, memory=config.resources.evaluate.memory,
               gpu=config.resources.evaluate.gpu)
    @step
    def evaluate(self):
        from steps.evaluate import evaluate_branch

        self.evaluation = None
        if self.distill_failure is None:  # a failed branch passes through to the join, which skips it
            base = self.base_evaluations[self.branch.base_model_key]
            with guarded_step("evaluate", self.mlflow_run_id, branch=True):
                self.evaluation = evaluate_branch(self.branch, self.trained.checkpoint_dir, self.trained.run_id, base)
        self.next(self.join)

    @card(type="blank", id="sweep", timeout=CARD_TIMEOUT_S)
    @step
    def join(self, inputs):
        from flows.cards import sweep_card
        from steps.join import TABLE_HEADERS, outcome_of, summarize_sweep

        outcomes = [
            outcome_of(getattr(i, "branch", None), getattr(i, "trained", None), getattr(i, "evaluation", None),
                       [getattr(i, "distill_failure", None), getattr(i, "eval_failure", None)])
            for i in inputs
        ]  # fmt: skip
        self.summary = summarize_sweep(outcomes)
        self.merge_artifacts(inputs, include=["plan", "mlflow_run_id"])
        current.card["sweep"].extend(sweep_card(self.summary, TABLE_HEADERS))
        self.next(self.register)

    @retry(times=1)
    @step
    def register(self):
        from steps.register import register_best

        with guarded_step("register", self.mlflow_run_id):
            self.registration = register_best(self.summary.best, flow_run_id=current.run_id)  # None if all failed
        self.next(self.end)

    @card(type="blank", id="summary", timeout=CARD_TIMEOUT_S)
    @step
    def end(self):
        from dashboards.report import build_report
        from flows.cards import sweep_card
        from steps.finish import finish
        from steps.join import TABLE_HEADERS

        with guarded_step("end", self.mlflow_run_id):
            self.report_path = finish(self.mlflow_run_id, self.summary, self.registration, current.pathspec,
                                      build_report=build_report)
        current.card["summary"].extend(sweep_card(self.summary, TABLE_HEADERS, self.registration, self.report_path))


if __name__ == "__main__":
    PCSDFlow()
