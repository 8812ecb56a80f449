"""The PCSD experiment flow: preprocess -> distill (one branch per sweep point) -> evaluate -> register.

    python flows/pcsd_flow.py run                                    # embedded CPU default (SmolLM2-135M)
    python flows/pcsd_flow.py --config config configs/gpu_gsm8k_7b.yaml run --total-steps 200
    python flows/pcsd_flow.py run --sweep '{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}'

Settings, highest first: these Parameters > the reference script's environment variables (MODEL_PATH,
DATA_PATH, TOTAL_STEPS, ACTOR_NUM_GPUS, ROLLOUT_NUM_GPUS) > the YAML preset (`steps/plan.py`).
Every run is tracked in MLflow (MLFLOW_TRACKING_URI, default sqlite:///<repo>/mlflow.db): one parent run,
one nested child run per branch. Look at it with `mlflow ui --backend-store-uri sqlite:///mlflow.db` and
`python flows/pcsd_flow.py card view <step>`. Steps only wire: the work is in `steps/`.
"""

from metaflow import Config, FlowSpec, Parameter, card, catch, current, retry, step, timeout

DISTILL_TIMEOUT_S = 12 * 3600  # a 7B preset on GPUs; a hung Ray worker must not hold the flow forever
CARD_TIMEOUT_S = 300  # card rendering is a subprocess; the default 45 s is too short on a busy 2-core machine


class PCSDFlow(FlowSpec):
    """Privileged Context Self-Distillation with tracking, sweeps, evaluation and a model registry."""

    config = Config("config", default="configs/cpu_smollm2.yaml", parser="steps.plan.parse_preset")
    model = Parameter("model", default="", help="model alias, hub id or folder (else MODEL_PATH, else preset)")
    total_steps = Parameter("total-steps", type=int, default=0, help="training steps (else TOTAL_STEPS, else preset)")
    data_path = Parameter("data-path", default="", help="local GSM8K folder, or 'hub' (else DATA_PATH, else preset)")
    lr = Parameter("lr", type=float, default=0.0, help="learning rate (else preset)")
    sweep = Parameter("sweep", default="", help='JSON grid, e.g. \'{"train.lr": [1e-5, 3e-5]}\' (else preset sweep:)')

    @step
    def start(self):
        from steps import tracking
        from steps.plan import plan_run

        knobs = dict(model=self.model, total_steps=self.total_steps, data_path=self.data_path, lr=self.lr)
        self.plan = plan_run(self.config, flow_run_id=current.run_id, sweep=self.sweep, **knobs)
        self.mlflow_run_id = tracking.start_parent_run(current.run_id, current.pathspec, self.plan.flat_params())
        self.next(self.preprocess)

    @retry(times=1)
    @step
    def preprocess(self):
        from steps.evaluate import evaluate_baselines
        from steps.plan import prepare_branches

        self.branches = prepare_branches(self.plan, self.mlflow_run_id)
        # The base model is evaluated once here, not once per branch.
        self.baselines = evaluate_baselines(self.branches, self.mlflow_run_id, self.plan.output_root)
        self.next(self.distill, foreach="branches")

    @card(type="blank", id="training", timeout=CARD_TIMEOUT_S)
    @catch(var="distill_failure")
    @timeout(seconds=DISTILL_TIMEOUT_S)
    @step
    def distill(self):
        from flows.cards import training_card
        from steps.distill import distill

        self.branch = self.input
        self.trained = distill(
            self.branch, parent_run_id=self.mlflow_run_id, flow_run_id=current.run_id, pathspec=current.pathspec
        )
        current.card["training"].extend(training_card(self.trained))
        self.next(self.evaluate)

    @catch(var="eval_failure")
    @retry(times=1)
    @step
    def evaluate(self):
        from steps.evaluate import evaluate_branch

        self.evaluation = None
        if self.distill_failure is None:  # a failed branch passes through to the join, which skips it
            baseline = self.baselines[self.branch.baseline_key]
            self.evaluation = evaluate_branch(self.branch, self.trained.checkpoint_dir, self.trained.run_id, baseline)
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
        self.merge_artifacts(inputs, include=["plan", "mlflow_run_id", "branches"])
        current.card["sweep"].extend(sweep_card(self.summary, TABLE_HEADERS))
        self.next(self.register)

    @retry(times=1)
    @step
    def register(self):
        from steps.register import register_best

        best = self.summary.best
        config = next((b.config for b in self.branches if best and b.label == best.label), None)
        self.registration = register_best(best, config, flow_run_id=current.run_id)  # None if all failed
        self.next(self.end)

    @card(type="blank", id="summary", timeout=CARD_TIMEOUT_S)
    @step
    def end(self):
        from flows.cards import sweep_card
        from steps.finish import finish
        from steps.join import TABLE_HEADERS

        self.report_path = finish(self.mlflow_run_id, self.summary, self.registration, current.pathspec)
        current.card["summary"].extend(sweep_card(self.summary, TABLE_HEADERS, self.registration, self.report_path))


if __name__ == "__main__":
    PCSDFlow()
