"""Admission's prediction of when a request finishes, from the scheduler's measured step times:
a decode step's time along a line through the row counts measured (so a burst into a service
measured at small batches is predicted at the full batch), the time per prompt position, and from
them the worker time per request and a request's time once it has a row."""

from __future__ import annotations

import pytest
from conftest import build_tiny_model

from ragpt.lm.generator import Generator
from ragpt.serving.scheduler import ContinuousBatcher, StepTimes
from ragpt_service.admission import Live, ServiceRate, estimate


def test_step_times_extrapolate_along_the_measured_line():
    t = StepTimes(alpha=1.0)
    assert t.predict(4) is None
    t.observe(1, 0.05)
    assert t.predict(16) == pytest.approx(0.05)  # one row count: the nearest measurement
    t.observe(4, 0.08)
    assert t.predict(16) == pytest.approx(0.05 + 15 * 0.01)  # 10 ms a row, from 1 and 4 rows
    assert t.predict(4) == pytest.approx(0.08)  # a measured count is used as measured
    t.observe(8, 0.05)  # a noisy point that would make the line fall: never below the fastest step
    assert t.predict(64) >= 0.05


class _Model:
    def __init__(self, step: float, prompt_s: float, slots: int):
        self.step, self.prompt_s, self.slots = step, prompt_s, slots

    def row_seconds(self, prompt, tokens, rows):
        return prompt * self.prompt_s * rows + (tokens - 1) * self.step

    def work_seconds(self, prompt, tokens):
        return prompt * self.prompt_s + tokens * self.step / self.slots


def _rate() -> ServiceRate:
    rate = ServiceRate(alpha=1.0)
    rate.observe({"prepare_s": 0.01, "first_token_s": 0.2, "generate_s": 1.0}, completion_tokens=10,
                 max_new_tokens=20, prompt_tokens=100)
    return rate


def test_with_rows_free_a_request_costs_its_time_in_a_row():
    rate, model = _rate(), _Model(step=0.1, prompt_s=0.001, slots=4)
    live = [Live(20, started=0.0), Live(20, started=0.0)]
    est = estimate(rate, live, 4, 20, now=1.0, model=model)
    # 3 rows running with it: 100 positions x 1 ms x 3 + 9 further tokens x 0.1 s (fill 0.5 of 20).
    assert est.wait_s == 0 and est.cost_s == pytest.approx(0.3 + 0.9)


def test_behind_a_full_batch_a_request_waits_one_request_of_work_per_request_ahead_and_itself():
    rate, model = _rate(), _Model(step=0.1, prompt_s=0.001, slots=2)
    live = [Live(20, started=0.0), Live(20, started=0.0), Live(20), Live(20), Live(40)]
    est = estimate(rate, live, 2, 20, now=1.0, model=model)
    work20, work40 = 0.1 + 10 * 0.1 / 2, 0.1 + 20 * 0.1 / 2
    assert est.wait_s == pytest.approx(2 * work20 + work40 + work20)
    assert est.cost_s == pytest.approx(100 * 0.001 * 2 + 9 * 0.1)
    assert est.ahead == 5


def test_calibration_scales_the_model_too():
    rate, model = _rate(), _Model(step=0.1, prompt_s=0.001, slots=1)
    live = [Live(20, started=0.0), Live(20)]
    before = estimate(rate, live, 1, 20, model=model)
    rate.calibration = 1.5
    after = estimate(rate, live, 1, 20, model=model)
    assert after.total_s == pytest.approx(1.5 * before.total_s)


def test_the_continuous_batcher_predicts_from_its_steps(tiny_tokenizer):
    b = ContinuousBatcher(Generator(build_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer), max_batch_size=8)
    assert b.row_seconds(100, 10, 4) is None and b.work_seconds(100, 10) is None  # nothing measured
    b._learn(decoding=1, prompt_positions=0, long_chunk=False, elapsed=0.05)
    b._learn(decoding=4, prompt_positions=0, long_chunk=False, elapsed=0.08)
    b._learn(decoding=4, prompt_positions=200, long_chunk=False, elapsed=0.08 + 0.2)  # 1 ms a position
    assert b.step_times.prompt_s == pytest.approx(0.001)
    step8 = 0.05 + 7 * 0.01
    assert b.work_seconds(100, 10) == pytest.approx(0.1 + 10 * step8 / 8)
    assert b.row_seconds(100, 10, 8) == pytest.approx(100 * 0.001 * 8 + 9 * step8)
