"""Training recipes mean the same thing in every framework: schedules, AdamW, RMSprop, clipping, label smoothing.

Runs in the equivalence suite's worker (tests/backends/equivalence_worker.py), one subprocess per framework,
PyTorch the reference. Checked: (a) the learning rate every framework holds at every step of a few hundred,
for every schedule, within 1e-7 relative; (b) per-step losses within 1e-3 and updated weights close, for each
optimizer with its recipe settings switched on; (c) a run split by get/set_training_state mid-schedule equals
the straight run.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest

from cnnrun.schedules import LearningRate, validate_schedule
from cnnrun.spec import compile_model
from tests.backends.test_equivalence import (
    OTHERS, REFERENCE, VARIANTS, Results, Variant, channel_stats, _param, _prefixed, make_weights,
)

pytestmark = pytest.mark.slow

BATCH, STEPS = 16, 6
INPUT = (1, 12, 12)
SPEC = {
    "name": "recipe_net",
    "layers": [
        {"type": "conv2d", "filters": 6, "kernel": 3, "padding": "same", "activation": "relu"},
        {"type": "batchnorm", "momentum": 0.9},
        {"type": "maxpool", "size": 2},
        {"type": "conv2d", "filters": 8, "kernel": 3, "stride": 2, "padding": "same", "activation": "tanh"},
        {"type": "flatten"},
        {"type": "dense", "units": 10},
        {"type": "softmax"},
    ],
}

# Each recipe switches on what it tests so that it changes the numbers: clip_norm below the gradients' global
# norm (the test checks that it clipped), schedules that move the rate at every one of the STEPS steps.
RECIPES: Dict[str, Dict] = {
    "adamw_cosine_clip_smooth": {
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05, "eps": 1e-7, "clip_norm": 0.5},
        "schedule": {"name": "cosine", "warmup_epochs": 0.34, "min_lr": 1e-4},
        "label_smoothing": 0.1,
    },
    "rmsprop_momentum_onecycle": {
        "optimizer": {"name": "rmsprop", "lr": 0.002, "alpha": 0.9, "eps": 1e-8, "momentum": 0.9,
                      "weight_decay": 0.01},
        "schedule": {"name": "onecycle", "pct_start": 0.3, "div_factor": 10.0, "final_div_factor": 100.0},
    },
    "rmsprop_clip": {
        "optimizer": {"name": "rmsprop", "lr": 0.001, "alpha": 0.99, "eps": 1e-8, "clip_norm": 0.5},
    },
    "sgd_clip": {"optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "clip_norm": 0.5}},
    "sgd_noclip": {"optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}},
    "adam_smooth": {"optimizer": {"name": "adam", "lr": 0.001, "eps": 1e-7}, "label_smoothing": 0.2},
    # mixup/cutmix batches: λ·CE(labels) + (1 − λ)·CE(partners), with label smoothing inside each term
    "sgd_mix_smooth": {"optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}, "label_smoothing": 0.1,
                       "mix_lams": [0.7, 0.35, 0.9, 0.5, 0.15, 0.6]},
    "sgd_smooth": {"optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}, "label_smoothing": 0.1},
}
# Pairs of recipes that differ in one setting: the reference must move apart, or the setting goes untested.
SWITCHES = {"clip_norm": ("sgd_clip", "sgd_noclip"), "label_smoothing": ("sgd_smooth", "sgd_noclip"),
            "mix": ("sgd_mix_smooth", "sgd_smooth")}

# A few hundred steps of every schedule, read back from each framework's optimizer.
RATE_EPOCHS, RATE_STEPS = 5, 60
SCHEDULES = {
    "constant": {"name": "constant"},
    "step": {"name": "step", "step_size": 2, "gamma": 0.5},
    "multistep": {"name": "multistep", "milestones": [1, 3], "gamma": 0.3},
    "exponential": {"name": "exponential", "gamma": 0.7},
    "cosine": {"name": "cosine", "warmup_epochs": 1.5, "min_lr": 1e-5},
    "onecycle": {"name": "onecycle", "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4},
    "plateau": {"name": "plateau", "factor": 0.3, "patience": 0, "threshold": 1e-4, "cooldown": 0, "min_lr": 0.0},
}
RATE_LR = 0.003
VAL_LOSSES = [1.0, 0.8, 0.85, 0.9, 0.7]  # plateau's input: two epochs without improvement, so two cuts


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Results:
    folder = tmp_path_factory.mktemp("recipes")
    model = compile_model(SPEC, INPUT, 10)
    rng = np.random.default_rng(7)
    c, h, w = INPUT
    data = {f"weights/{k}": v for k, v in make_weights(model, 7).items()}
    data["batch_images"] = rng.integers(0, 256, (STEPS, BATCH, h, w, c), dtype=np.uint8)
    data["batch_labels"] = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int64)
    data["batch_partner_labels"] = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int64)
    np.savez(folder / "recipe.npz", **data)
    commands = [{"kind": "train", "id": name, **recipe} for name, recipe in RECIPES.items()]
    commands.append({"kind": "resume", **RECIPES["rmsprop_momentum_onecycle"]})
    commands += [
        {"kind": "rates", "id": f"rates_{name}", "schedule": schedule, "optimizer": {"name": "sgd", "lr": RATE_LR},
         "epochs": RATE_EPOCHS, "steps_per_epoch": RATE_STEPS, "val_losses": VAL_LOSSES}
        for name, schedule in SCHEDULES.items()
    ]
    mean, std = channel_stats(c)
    case = {"name": "recipe", "spec": SPEC, "input_shape": list(INPUT), "num_classes": 10, "mean": list(mean),
            "std": list(std), "data": str(folder / "recipe.npz"), "commands": commands}
    return Results({"folder": folder, "cases": [case]})


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_every_framework_holds_the_schedules_rate_at_every_step(results, variant, schedule):
    rate = LearningRate(validate_schedule(SCHEDULES[schedule]), RATE_LR, RATE_EPOCHS)
    expected, state = [], rate.initial_state()
    for epoch in range(RATE_EPOCHS):
        expected += [rate.at(epoch, step, RATE_STEPS, state) for step in range(RATE_STEPS)]
        state = rate.end_epoch(state, VAL_LOSSES[epoch])
    held = results(variant)[f"recipe/rates_{schedule}/rates"]
    assert len(held) == RATE_EPOCHS * RATE_STEPS
    np.testing.assert_allclose(held, expected, rtol=1e-7, atol=0)
    if schedule != "constant":
        assert len(set(np.round(expected, 12))) >= 3  # the schedule really moves


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("variant", [_param(v) for v in OTHERS])
def test_recipe_training_steps_match_the_reference(results, variant, recipe):
    key = f"recipe/{recipe}"
    reference, result = results(Variant(REFERENCE, REFERENCE)), results(variant)
    np.testing.assert_allclose(result[f"{key}/losses"], reference[f"{key}/losses"], rtol=0, atol=1e-3)
    expected, actual = _prefixed(reference, f"{key}/weights/"), _prefixed(result, f"{key}/weights/")
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=WEIGHT_ATOL, err_msg=name)


# Below the smallest per-step movement of these recipes' learning rates (1e-4 and up), so a wrong rate, a
# missing decay or an unclipped gradient moves some weight past it.
WEIGHT_ATOL = 2e-5


@pytest.mark.parametrize("setting", list(SWITCHES))
def test_each_setting_changes_the_update_in_the_reference(results, setting):
    reference = results(Variant(REFERENCE, REFERENCE))
    on, off = (_prefixed(reference, f"recipe/{name}/weights/") for name in SWITCHES[setting])
    assert max(np.abs(on[n] - off[n]).max() for n in on) > 1e-3


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_resuming_mid_schedule_continues_exactly(results, variant):
    result = results(variant)
    np.testing.assert_allclose(result["recipe/resume/resumed"], result["recipe/resume/straight"], rtol=0, atol=1e-6)
