"""Learning-rate schedules: PyTorch's formulas step for step, plateau's state machine, validation, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnnrun.errors import ConfigError
from cnnrun.schedules import LearningRate, PlateauState, plateau_update, validate_schedule

LR = 0.1


def _torch_rates(make_scheduler, steps: int, per_epoch_of: int = 1):
    """The rate torch's scheduler gives at each of ``steps`` optimizer steps (stepped every ``per_epoch_of``)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = make_scheduler(optimizer)
    rates = []
    for i in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if (i + 1) % per_epoch_of == 0:
            scheduler.step()
    return rates


def _ours(settings: dict, epochs: int, steps_per_epoch: int):
    rate = LearningRate(validate_schedule(settings), LR, epochs)
    return [rate.at(e, s, steps_per_epoch, None) for e in range(epochs) for s in range(steps_per_epoch)]


EPOCHS, STEPS = 8, 37  # 296 steps, an odd epoch length

PER_EPOCH = {
    "step": ({"name": "step", "step_size": 3, "gamma": 0.5},
             lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    "multistep": ({"name": "multistep", "milestones": [2, 5, 6], "gamma": 0.3},
                  lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 6], gamma=0.3)),
    "exponential": ({"name": "exponential", "gamma": 0.8},
                    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8)),
}


@pytest.mark.parametrize("name", list(PER_EPOCH))
def test_per_epoch_schedules_equal_torchs(name):
    settings, make = PER_EPOCH[name]
    expected = _torch_rates(make, EPOCHS * STEPS, per_epoch_of=STEPS)
    np.testing.assert_allclose(_ours(settings, EPOCHS, STEPS), expected, rtol=1e-12, atol=0)


def test_cosine_with_warmup_equals_torchs_linear_then_cosine():
    warmup = 2 * STEPS + 5  # warmup_epochs is in epochs: 2 epochs and 5 steps
    total = EPOCHS * STEPS

    def make(optimizer):
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=1e-4)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])

    ours = _ours({"name": "cosine", "warmup_epochs": warmup / STEPS, "min_lr": 1e-4}, EPOCHS, STEPS)
    np.testing.assert_allclose(ours, _torch_rates(make, total), rtol=1e-7, atol=0)
    assert ours[warmup - 1] == pytest.approx(LR) and ours[0] == pytest.approx(LR / warmup)


def test_cosine_without_warmup_starts_at_the_full_rate():
    ours = _ours({"name": "cosine", "warmup_epochs": 0, "min_lr": 0.0}, 2, 10)
    assert ours[0] == LR and ours[-1] == pytest.approx(LR * (1 + math.cos(math.pi * 19 / 20)) / 2)


def test_onecycle_equals_torchs():
    total = EPOCHS * STEPS

    def make(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=LR, total_steps=total, pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
            anneal_strategy="cos", cycle_momentum=False,
        )

    ours = _ours({"name": "onecycle", "pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4}, EPOCHS, STEPS)
    np.testing.assert_allclose(ours, _torch_rates(make, total), rtol=1e-7, atol=0)
    assert max(ours) == pytest.approx(LR, rel=1e-3)


def test_plateau_equals_torchs_reduce_on_plateau():
    losses = [1.0, 0.9, 0.95, 0.91, 0.9, 0.899995, 0.92, 0.5] + [0.6] * 12
    settings = {"name": "plateau", "factor": 0.5, "patience": 1, "threshold": 1e-4, "cooldown": 1, "min_lr": 0.01}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=1, threshold=1e-4, threshold_mode="rel", cooldown=1, min_lr=0.01
    )
    schedule = validate_schedule(settings)
    state = PlateauState(LR)
    ours, theirs = [], []
    for loss in losses:
        optimizer.step()
        reference.step(loss)
        state = plateau_update(schedule, state, loss)
        ours.append(state.lr)
        theirs.append(optimizer.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert min(ours) == 0.01 and len(set(ours)) >= 5  # it reduced several times and stopped at min_lr


def test_plateau_rate_is_held_for_the_whole_epoch_and_carried_by_the_state():
    rate = LearningRate(validate_schedule({"name": "plateau", "factor": 0.1, "patience": 0, "threshold": 0.0,
                                           "cooldown": 0, "min_lr": 0.0}), LR, 5)
    state = rate.initial_state()
    assert rate.at(0, 0, 10, state) == rate.at(0, 9, 10, state) == LR
    state = rate.end_epoch(state, 1.0)  # the first loss is an improvement
    state = rate.end_epoch(state, 1.0)  # no improvement, patience 0: reduce
    assert rate.at(2, 0, 10, state) == pytest.approx(LR * 0.1)
    assert rate.at(2, 0, 10, PlateauState(**state).to_dict()) == rate.at(2, 0, 10, state)  # survives a checkpoint


def test_only_plateau_keeps_state():
    assert LearningRate(validate_schedule({"name": "constant"}), LR, 3).initial_state() is None
    cosine = LearningRate(validate_schedule({"name": "cosine", "warmup_epochs": 0, "min_lr": 0}), LR, 3)
    assert cosine.end_epoch(None, 0.5) is None


@pytest.mark.parametrize(
    "settings, key, words",
    [
        ({"name": "cosin"}, "schedule.name", "did you mean 'cosine'"),
        ({"name": "step", "step_size": 0, "gamma": 0.5}, "schedule.step_size", "greater than 0"),
        ({"name": "step", "step_size": 2, "gamma": 0.5, "warmup": 1}, "schedule.warmup", "unknown key"),
        ({"name": "multistep", "milestones": [5, 3], "gamma": 0.1}, "schedule", "increasing"),
        ({"name": "onecycle", "pct_start": 1.5, "div_factor": 25, "final_div_factor": 1e4}, "schedule.pct_start",
         "less than 1"),
    ],
)
def test_bad_schedule_settings_name_the_key(settings, key, words):
    with pytest.raises(ConfigError) as err:
        validate_schedule(settings)
    assert any(p.key == key and words in p.message for p in err.value.problems), err.value
