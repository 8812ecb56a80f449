"""The names of the metrics the engine reports, defined once: the trainer logs them, the flow's tracking contract
contract, the card, the plots and the report read them back by these constants."""

# Per training step (`Distiller._step_metrics`).
TRAIN_LOSS = "train/loss"
TRAIN_KL = "train/kl"  # exact KL(teacher || student) per counted response token
TRAIN_TEACHER_ENTROPY = "train/teacher_entropy"
TRAIN_STUDENT_ENTROPY = "train/student_entropy"
TRAIN_REF_KL = "train/ref_kl"  # exact KL(student || initial model) per counted response token (loss.ref_kl_coef > 0)
TRAIN_RESPONSE_LEN = "train/response_len"
TRAIN_TRUNCATED_FRAC = "train/truncated_frac"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_LR = "train/lr"
ROLLOUT_ACCURACY = "rollout/accuracy"
# Collapse diagnostics (`pcsd_core.eval.collapse`): the share of the step's sampled responses that loop, and the
# share of the step's summed per-token loss carried by its top 10% of tokens by loss.
ROLLOUT_REPETITION_RATE = "rollout/repetition_rate"
TRAIN_LOSS_SHARE_TOP10PCT_TOKENS = "train/loss_share_top10pct_tokens"
PERF_TOKENS_PER_S = "perf/tokens_per_s"  # response tokens sampled and trained on per second of the whole step
PERF_PEAK_MEM_MB = "perf/peak_mem_mb"
# Seconds of each phase of a step, and of the whole step.
TIME_ROLLOUT_S = "time/rollout_s"
TIME_TEACHER_S = "time/teacher_s"
TIME_UPDATE_S = "time/update_s"
TIME_WEIGHT_SYNC_S = "time/weight_sync_s"
TIME_STEP_S = "time/step_s"
# Validation during training (`pcsd_core.eval.validation`): the held-out metrics below (`summarize_scores`
# names) under this prefix, at the step they were measured after, e.g. `val/accuracy_strict`.
VALIDATION_PREFIX = "val/"
# Evaluation progress, per batch of questions.
EVAL_PROGRESS_QUESTIONS = "eval/progress/questions_done"
EVAL_PROGRESS_TOKENS_PER_S = "eval/progress/tokens_per_s"

# The signs of a collapsing run, per step: responses that loop or shrink, entropies falling toward 0, the loss
# concentrating on a few tokens. The card and the report tabulate them (first -> last step).
COLLAPSE_METRICS = (ROLLOUT_REPETITION_RATE, TRAIN_RESPONSE_LEN, TRAIN_STUDENT_ENTROPY, TRAIN_TEACHER_ENTROPY,
                    TRAIN_LOSS_SHARE_TOP10PCT_TOKENS)
# The training curves the card, the plots and the report draw (the collapse diagnostics among them).
CURVE_METRICS = (TRAIN_LOSS, TRAIN_KL, TRAIN_TEACHER_ENTROPY, TRAIN_STUDENT_ENTROPY, TRAIN_RESPONSE_LEN,
                 ROLLOUT_ACCURACY, PERF_TOKENS_PER_S, ROLLOUT_REPETITION_RATE, TRAIN_LOSS_SHARE_TOP10PCT_TOKENS)

# Held-out metrics of an evaluated model, beside the accuracies (`pcsd_core.eval.metrics`); a metric with a 95%
# interval also has `<name>_low` and `<name>_high`.
ACCURACY_METRICS = ("gsm8k_accuracy_strict", "gsm8k_accuracy_flexible")
ANSWER_FORMAT_RATE = "answer_format_rate"
REPETITION_RATE = "repetition_rate"
TRUNCATION_RATE = "truncation_rate"
MEAN_RESPONSE_TOKENS = "mean_response_tokens"
HELDOUT_KL = "heldout_kl"
HELDOUT_METRICS = (ANSWER_FORMAT_RATE, REPETITION_RATE, TRUNCATION_RATE, MEAN_RESPONSE_TOKENS, HELDOUT_KL,
                   "heldout_kl_questions", "num_questions")
INTERVAL_SUFFIXES = ("_low", "_high")
