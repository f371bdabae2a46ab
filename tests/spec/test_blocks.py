"""Residual shortcuts written out, and repeat: expansion, per-repetition overrides, names and their problems."""

import pytest

from cnnrun.errors import ConfigError
from cnnrun.spec import compile_model

HEAD = [{"type": "global_avgpool"}, {"type": "dense", "units": 10}]
BN = {"type": "batchnorm"}


def compile_layers(layers, input_shape=(3, 8, 8)):
    return compile_model({"name": "t", "layers": layers}, input_shape, 10, "t.yaml")


def problems(layers, input_shape=(3, 8, 8)):
    with pytest.raises(ConfigError) as err:
        compile_layers(layers, input_shape)
    return [str(p) for p in err.value.problems]


def conv(filters, stride=1, kernel=3, **extra):
    return {"type": "conv2d", "filters": filters, "kernel": kernel, "stride": stride, "padding": "same", **extra}


def block(filters, stride=1, **extra):
    return {"type": "residual", "layers": [conv(filters, stride, bias=False), BN], **extra}


# ------------------------------------------------------------------------------------------------ shortcut


def test_an_explicit_shortcut_is_compiled_below_the_block_with_its_own_names():
    model = compile_layers([block(6, 2, shortcut=[conv(6, 2, kernel=1, bias=False), BN]), *HEAD])
    residual = model.layers[0]
    assert [layer.name for layer in residual.shortcut] == ["residual_0/shortcut/conv2d_0",
                                                           "residual_0/shortcut/batchnorm_1"]
    assert [layer.key for layer in residual.shortcut] == ["model.layers[0].shortcut[0]", "model.layers[0].shortcut[1]"]
    assert residual.shortcut[0].weights == {"kernel": (6, 3, 1, 1)}  # bias: false, as written
    assert residual.shortcut[-1].out_shape == residual.out_shape == (6, 4, 4)
    assert "residual_0/shortcut/batchnorm_1/moving_variance" in model.weight_shapes()
    assert residual.params == 6 * 3 * 9 + 12 + 6 * 3 + 12


def test_without_shortcut_the_projection_stays_the_default():
    (projection,) = compile_layers([block(6, 2), *HEAD]).layers[0].shortcut
    assert projection.name == "residual_0/shortcut" and projection.weights == {"kernel": (6, 3, 1, 1), "bias": (6,)}


def test_an_empty_shortcut_is_the_identity():
    residual = compile_layers([block(3, shortcut=[]), *HEAD]).layers[0]
    assert residual.shortcut == [] and residual.out_shape == (3, 8, 8)


def test_an_empty_shortcut_where_the_shape_changes_is_refused_not_projected():
    assert problems([block(6, 2, shortcut=[]), *HEAD]) == [
        "model.layers[0].shortcut: shortcut: [] is the identity, which gives 3×8×8 but the block's layers give "
        "6×4×4; the two are added, so their shapes must be equal (give a projection, e.g. a 1×1 conv with the "
        "body's stride)"]


def test_a_shortcut_that_misses_the_body_shape_names_both_shapes():
    assert problems([block(6, 2, shortcut=[conv(5, 2, kernel=1)]), *HEAD]) == [
        "model.layers[0].shortcut: the shortcut gives 5×4×4 but the block's layers give 6×4×4; the two are added, "
        "so their shapes must be equal"]


def test_a_shortcut_layer_with_no_output_is_reported_at_its_key_with_the_shortcuts_shapes():
    assert problems([block(6, 2, shortcut=[conv(6, 2, kernel=1), {"type": "maxpool", "size": 9}]), *HEAD]) == [
        "model.layers[0].shortcut[1]: (maxpool) output would be 6×0×0 for an input of 6×4×4; shapes so far "
        "3×8×8 -> 6×4×4"]


def test_shortcut_layers_follow_the_residual_body_rules():
    found = problems([block(3, shortcut=[{"type": "flatten"}]), *HEAD])
    assert found[0].startswith("model.layers[0].shortcut[0]: flatten cannot stand inside a residual block")


# ------------------------------------------------------------------------------------------------ repeat


def test_repeat_expands_in_place_with_deterministic_names():
    model = compile_layers([conv(4), {"type": "repeat", "times": 3, "layers": [conv(4), BN]}, *HEAD])
    assert [layer.name for layer in model.layers] == [
        "conv2d_0", "repeat_1_0/conv2d_0", "repeat_1_0/batchnorm_1", "repeat_1_1/conv2d_0", "repeat_1_1/batchnorm_1",
        "repeat_1_2/conv2d_0", "repeat_1_2/batchnorm_1", "global_avgpool_2", "dense_3"]
    assert model.layers[3].key == "model.layers[1].layers[0]"


def test_a_named_repeat_names_its_repetitions_and_nests_in_residual_blocks():
    model = compile_layers([{"type": "repeat", "name": "stage", "times": 2, "layers": [block(3)]}, *HEAD])
    assert [layer.name for layer in model.walk()][:4] == [
        "stage_0/residual_0", "stage_0/residual_0/conv2d_0", "stage_0/residual_0/batchnorm_1", "stage_1/residual_0"]
    inner = compile_layers([{"type": "residual", "layers": [{"type": "repeat", "times": 2, "layers": [conv(3)]}]},
                            *HEAD])
    assert [layer.name for layer in inner.layers[0].body] == ["residual_0/repeat_0_0/conv2d_0",
                                                               "residual_0/repeat_0_1/conv2d_0"]


def test_overrides_change_one_repetition_by_index_as_ints_or_strings():
    stage = {"type": "repeat", "name": "s", "times": 3, "layers": [block(6, shortcut=[])],
             "overrides": {0: {0: {"layers": {"0": {"stride": 2}}, "shortcut": [conv(6, 2, kernel=1)]}},
                           "2": {"0": {"activation": "relu"}}}}
    model = compile_layers([conv(6), stage, *HEAD])
    first, second, third = model.layers[1:4]
    assert first.body[0].spec.stride == (2, 2) and len(first.shortcut) == 1 and first.out_shape == (6, 4, 4)
    assert second.body[0].spec.stride == (1, 1) and second.shortcut == []
    assert third.spec.activation == "relu" and second.spec.activation == "linear"
    assert first.key == "model.layers[1].overrides[0][0]" and second.key == "model.layers[1].layers[0]"


def test_an_index_given_as_int_and_as_string_is_merged_the_later_winning():
    stage = {"type": "repeat", "times": 1, "layers": [conv(4)],
             "overrides": {0: {0: {"filters": 5, "stride": 2}}, "0": {"0": {"filters": 7}}}}
    (layer,) = compile_layers([stage, *HEAD]).layers[:1]
    assert layer.out_shape == (7, 4, 4)


def test_every_override_problem_is_reported_with_its_key():
    stage = {"type": "repeat", "times": 2, "layers": [block(3)],
             "overrides": {"1": {"0": {"layers": {"7": {"stride": 2}}, "activaton": "relu"}}, "4": {}}}
    assert problems([stage, *HEAD]) == [
        "model.layers[0].overrides[4]: there is no repetition 4: times is 2 (repetitions 0–1)",
        "model.layers[0].overrides[1][0].layers[7]: no such item: the list has 2 (indices 0–1)",
    ]
    stage["overrides"] = {"1": {"0": {"activaton": "relu"}}}
    (found,) = problems([stage, *HEAD])
    assert found.startswith("model.layers[0].overrides[1][0].activaton: unknown key 'activaton' (did you mean "
                            "'activation'?)")


def test_a_shape_problem_in_one_repetition_says_which():
    (found,) = problems([{"type": "repeat", "times": 4, "layers": [{"type": "maxpool", "size": 2}]}, *HEAD],
                        (3, 4, 4))
    assert found.startswith("model.layers[0].layers[0]: (maxpool, repetition 2 of 4) output would be 3×0×0")


def test_a_problem_in_the_repeated_layers_is_reported_once():
    assert problems([{"type": "repeat", "times": 3, "layers": [{"type": "dense", "units": 4}]}, *HEAD]) == [
        "model.layers[0].layers[0]: (dense, repetition 0 of 3) needs a vector but receives a 3×8×8 feature map; "
        "add {type: flatten} or {type: global_avgpool} before it; shapes so far 3×8×8"]
    assert problems([{"type": "residual", "layers": [{"type": "repeat", "times": 2,
                                                      "layers": [{"type": "flatten"}]}]}, *HEAD]) == [
        "model.layers[0].layers[0].layers[0]: flatten cannot stand inside a residual block; allowed: conv2d, "
        "depthwise_conv2d, separable_conv2d, maxpool, avgpool, dropout, batchnorm, activation, residual, repeat"]


@pytest.mark.parametrize("bad,message", [
    ({"times": 0}, "model.layers[0].times: input should be greater than or equal to 1; received 0"),
    ({"overrides": {"first": {}}}, "model.layers[0].overrides: keys are repetition indices (0, 1, …); "
                                   "received 'first'"),
    ({"overrides": [1]}, "model.layers[0].overrides: expected a mapping from repetition index to changes; "
                         "received [1]"),
])
def test_repeat_fields_are_checked(bad, message):
    stage = {"type": "repeat", "times": 2, "layers": [conv(3)], **bad}
    assert problems([stage, *HEAD]) == [message]


def test_the_resolved_spec_round_trips_through_json_and_compiles_alike():
    """Checkpoints store the resolved spec as JSON (int override keys become strings): it must compile the same."""
    import json

    stage = {"type": "repeat", "times": 2, "layers": [block(6, shortcut=[])],
             "overrides": {0: {0: {"layers": {0: {"stride": 2}}, "shortcut": [conv(6, 2, kernel=1)]}}}}
    model = compile_layers([conv(6), stage, *HEAD])
    again = compile_model(json.loads(json.dumps(model.spec)), (3, 8, 8), 10)
    assert again.weight_shapes() == model.weight_shapes()
