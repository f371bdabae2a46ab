"""Dilation, groups, depthwise and separable convolutions, global max pooling, upsampling and the newer
activations: their checks (every problem at once, under its key), shapes, weight shapes, FLOPs and fans."""

import pytest

from cnnrun.errors import ConfigError
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights


def compile_layers(layers, input_shape=(4, 9, 10), classes=10):
    return compile_model({"name": "t", "layers": layers}, input_shape, classes, "t.yaml")


def problems(layers, input_shape=(4, 9, 10)):
    with pytest.raises(ConfigError) as err:
        compile_layers(layers, input_shape)
    return [str(p) for p in err.value.problems]


HEAD = [{"type": "global_maxpool"}, {"type": "dense", "units": 10}]


def test_every_field_problem_of_the_new_layers_is_reported_at_once():
    found = problems([
        {"type": "conv2d", "filters": 6, "kernel": 3, "groups": 4},
        {"type": "conv2d", "filters": 4, "kernel": 3, "dilation": [2, 0]},
        {"type": "conv2d", "filters": 4, "kernel": 3, "groups": 0},
        {"type": "depthwise_conv2d", "kernel": 3, "stride": 2, "dilation": 2},
        {"type": "separable_conv2d", "kernel": 3, "depth_multiplier": 0},
        {"type": "upsample", "size": [2, 0], "interpolation": "cubic"},
        {"type": "activation", "fn": "silo"},
        {"type": "depthwise_conv2d", "kernel": 3, "groups": 2},
        *HEAD,
    ])
    assert found == [
        "model.layers[0]: filters (6) must be divisible by groups (4)",
        "model.layers[1].dilation: expected an int >= 1 or [h, w] of such ints for dilation; received [2, 0]",
        "model.layers[2].groups: input should be greater than 0; received 0",
        "model.layers[3]: stride [2, 2] and dilation [2, 2] cannot both exceed 1 (dilated convolutions run at "
        "stride 1 in TensorFlow and Keras); set one of them to 1",
        "model.layers[4].filters: required key is missing (Output channels.)",
        "model.layers[4].depth_multiplier: input should be greater than 0; received 0",
        "model.layers[5].size: expected an int >= 1 or [h, w] of such ints for size; received [2, 0]",
        "model.layers[5].interpolation: expected 'nearest' or 'bilinear'; received 'cubic'",
        "model.layers[6].fn: expected 'linear', 'relu', 'tanh', 'sigmoid', 'elu', 'leaky_relu', 'relu6', 'gelu', "
        "'swish', 'hard_swish' or 'silu'; received 'silo' (did you mean 'silu'?)",
        "model.layers[7].groups: unknown key 'groups'; allowed keys: name, padding, kernel, stride, dilation, "
        "activation, bias, depth_multiplier",
    ]


def test_groups_must_divide_the_input_channels():
    (found,) = problems([{"type": "conv2d", "filters": 8, "kernel": 3, "groups": 4}, *HEAD], (6, 8, 8))
    assert found == ("model.layers[0]: (conv2d) its input has 6 channels, which groups (4) does not divide; use a "
                     "groups value that divides both 6 and filters (8); shapes so far 6×8×8")


@pytest.mark.parametrize("kind", ["depthwise_conv2d", "upsample", "global_maxpool"])
def test_map_layers_refuse_a_vector(kind):
    layer = {"type": kind, "kernel": 3} if kind == "depthwise_conv2d" else {"type": kind}
    found = problems([{"type": "flatten"}, layer, {"type": "dense", "units": 10}])
    assert found[0].startswith(f"model.layers[1]: ({kind}) needs a C×H×W feature map")


def test_shapes_weights_flops_and_fans():
    model = compile_layers([
        {"type": "conv2d", "filters": 8, "kernel": 3, "groups": 2, "dilation": 2, "padding": "same"},
        {"type": "depthwise_conv2d", "kernel": 3, "stride": 2, "padding": "same", "depth_multiplier": 2},
        {"type": "separable_conv2d", "filters": 5, "kernel": [3, 2], "depth_multiplier": 3, "bias": False},
        {"type": "upsample", "size": [2, 3], "interpolation": "bilinear"},
        {"type": "conv2d", "filters": 4, "kernel": [2, 3], "dilation": [3, 1], "padding": 1},
        *HEAD,
    ])
    conv, depthwise, separable, upsample, dilated, pool, _ = model.layers
    # 'same' with a dilated 3×3 kernel pads for its 5×5 extent; stride-2 'same' on 9×10 pads (1, 1), (0, 1).
    assert conv.out_shape == (8, 9, 10) and conv.pads == ((2, 2), (2, 2))
    assert conv.weights == {"kernel": (8, 2, 3, 3), "bias": (8,)}
    assert conv.flops == 2 * 2 * 9 * 8 * 9 * 10
    assert conv.spec.fans("kernel", conv.weights["kernel"]) == (2 * 9, 4 * 9)
    assert depthwise.out_shape == (16, 5, 5) and depthwise.pads == ((1, 1), (0, 1))
    assert depthwise.weights == {"kernel": (16, 1, 3, 3), "bias": (16,)}
    assert depthwise.spec.fans("kernel", depthwise.weights["kernel"]) == (9, 18)
    assert separable.out_shape == (5, 3, 4)
    assert separable.weights == {"depthwise_kernel": (48, 1, 3, 2), "pointwise_kernel": (5, 48, 1, 1)}
    assert [separable.spec.fans(name, separable.weights[name]) for name in ("depthwise_kernel", "pointwise_kernel")] \
        == [(6, 18), (48, 5)]
    assert separable.flops == 2 * 6 * 48 * 12 + 2 * 48 * 5 * 12
    assert upsample.out_shape == (5, 6, 12) and upsample.weights == {}
    assert dilated.out_shape == (4, 6 + 2 - 3 * 1 - 1 + 1, 12 + 2 - 2)  # extent (4, 3)
    assert pool.out_shape == (4,)
    assert model.params == 8 * 18 + 8 + 16 * 9 + 16 + 48 * 6 + 48 * 5 + 4 * 5 * 6 + 4 + 4 * 10 + 10


def test_every_kernel_is_drawn_within_its_glorot_limit():
    model = compile_layers([
        {"type": "depthwise_conv2d", "kernel": 3, "depth_multiplier": 2},
        {"type": "separable_conv2d", "filters": 6, "kernel": 3},
        *HEAD,
    ])
    weights = initial_weights(model, 0)
    depthwise_limit = (6 / (9 + 18)) ** 0.5
    assert 0.9 * depthwise_limit < abs(weights["depthwise_conv2d_0/kernel"]).max() <= depthwise_limit
    assert abs(weights["separable_conv2d_1/depthwise_kernel"]).max() <= (6 / (9 + 9)) ** 0.5
    assert abs(weights["separable_conv2d_1/pointwise_kernel"]).max() <= (6 / (8 + 6)) ** 0.5
    assert not weights["separable_conv2d_1/bias"].any()


def test_silu_is_swish_and_the_new_activations_are_accepted_everywhere():
    model = compile_layers([
        {"type": "conv2d", "filters": 4, "kernel": 1, "activation": "silu"},
        {"type": "residual", "activation": "hard_swish", "layers": [
            {"type": "depthwise_conv2d", "kernel": 3, "padding": "same", "activation": "relu6"},
            {"type": "separable_conv2d", "filters": 4, "kernel": 3, "padding": "same", "activation": "gelu"},
            {"type": "activation", "fn": "silu"},
        ]},
        {"type": "global_maxpool"},
        {"type": "dense", "units": 10, "activation": "swish"},
    ])
    assert model.spec["layers"][0]["activation"] == "swish"
    assert [layer.spec.activation for layer in model.layers[1].body[:2]] == ["relu6", "gelu"]
    assert model.layers[1].body[2].spec.fn == "swish"
    assert model.layers[1].shortcut is None


def test_a_strided_depthwise_body_gets_a_projection_with_its_stride():
    model = compile_layers([
        {"type": "residual", "layers": [
            {"type": "depthwise_conv2d", "kernel": 3, "stride": 2, "padding": "same", "depth_multiplier": 2}]},
        *HEAD,
    ])
    shortcut = model.layers[0].shortcut
    assert shortcut.spec.stride == (2, 2) and shortcut.out_shape == (8, 5, 5)


def test_upsample_and_global_maxpool_cannot_stand_in_a_residual_body():
    found = problems([{"type": "residual", "layers": [{"type": "upsample"}, {"type": "global_maxpool"}]},
                      *HEAD])
    assert found[0].startswith("model.layers[0].layers[0]: upsample cannot stand inside a residual block")
    assert found[1].startswith("model.layers[0].layers[1]: global_maxpool cannot stand inside a residual block")
