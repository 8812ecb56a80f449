"""Validation during training, the pure parts: the held-out slice, the keep-best rule, the config rules.
The trainer's use of them: tests/pcsd_core/engine/test_trainer_validation.py."""

from __future__ import annotations

import pytest

from pcsd_core.config.loader import config_from_dict
from pcsd_core.errors import ConfigError, DataValidationError
from pcsd_core.eval.validation import Validation, best_validation, split_validation_records


def summary(strict: float, format_rate: float = 0.5, repetition: float = 0.0) -> dict[str, float]:
    return {"accuracy_strict": strict, "accuracy_flexible": strict, "answer_format_rate": format_rate,
            "repetition_rate": repetition}


def test_the_best_validation_is_the_highest_metric_then_format_then_less_repetition_then_the_earliest():
    peaks_early = [Validation(2, summary(0.4)), Validation(4, summary(0.6)), Validation(6, summary(0.3)),
                   Validation(8, summary(0.1))]
    assert best_validation(peaks_early, "accuracy_strict").step == 4
    tied = [Validation(2, summary(0.5, 0.5, 0.2)), Validation(4, summary(0.5, 0.7, 0.3)),
            Validation(6, summary(0.5, 0.7, 0.1)), Validation(8, summary(0.5, 0.7, 0.1))]
    assert best_validation(tied, "accuracy_strict").step == 6  # format 0.7 beats 0.5; less repetition; earlier
    with pytest.raises(ValueError):
        best_validation([], "accuracy_strict")


def test_validation_questions_come_off_the_end_of_the_train_split_and_must_leave_some_to_train_on():
    train, held_out = split_validation_records(list(range(10)), 3)
    assert train == list(range(7)) and held_out == [7, 8, 9]
    with pytest.raises(DataValidationError, match="eval.validation_questions"):
        split_validation_records(list(range(4)), 4)


def test_keep_best_and_the_collapse_stop_need_validation():
    for field, value in (("train.keep_best_by", "accuracy_strict"), ("train.stop_if_repetition_above", 0.5)):
        with pytest.raises(ConfigError, match="train.validate_every") as error:
            config_from_dict({}, {field: value})
        assert error.value.field == field
