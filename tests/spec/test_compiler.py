import re

import pytest

from cnnrun.errors import ConfigError
from cnnrun.spec import LAYER_TYPES, compile_model
from tests.helpers import shipped_model, shipped_models


def compile_layers(layers, input_shape=(1, 28, 28), classes=10):
    return compile_model({"name": "t", "layers": layers}, input_shape, classes, "t.yaml")


def problems(layers, input_shape=(1, 28, 28), classes=10):
    with pytest.raises(ConfigError) as err:
        compile_layers(layers, input_shape, classes)
    return [str(p) for p in err.value.problems]


# Presets whose five 2×2 poolings need at least 32×32 (as Keras's VGG16 does): refused on smaller images.
NEEDS_32 = {"vgg16": "model.layers[9]: (maxpool) output would be 512×0×0"}


@pytest.mark.parametrize("name", shipped_models())
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)])
def test_shipped_models_compile_for_mnist_and_cifar_shapes(name, input_shape):
    if name in NEEDS_32 and input_shape[1] < 32:
        with pytest.raises(ConfigError, match=re.escape(NEEDS_32[name])):
            compile_model(shipped_model(name), input_shape, 10)
        return
    model = compile_model(shipped_model(name), input_shape, 10)
    assert model.output_shape == (10,)
    assert model.params > 0 and model.flops > 0


def test_classic_cnn_numbers():
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    shapes = [layer.out_shape for layer in model.layers]
    assert shapes == [(32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 7, 7), (3136,), (1024,), (10,), (10,)]
    assert model.params == 832 + 51264 + 3136 * 1024 + 1024 + 10250
    assert model.layers[5].flattened_from == (64, 7, 7)


def test_resnet_lite_has_projection_shortcuts_where_shape_changes():
    model = compile_model(shipped_model("resnet_lite"), (1, 28, 28), 10)
    residuals = [layer for layer in model.layers if layer.type == "residual"]
    assert [len(r.shortcut) for r in residuals] == [0, 0, 1, 0, 1, 0]
    (shortcut,) = residuals[2].shortcut
    assert shortcut.spec.stride == (2, 2) and shortcut.spec.kernel == (1, 1)
    assert shortcut.out_shape == residuals[2].out_shape == (32, 14, 14)


def test_uneven_same_padding_goes_after():
    model = compile_layers([{"type": "conv2d", "filters": 2, "kernel": 4, "stride": 2, "padding": "same"},
                            {"type": "flatten"}, {"type": "dense", "units": 10}], (1, 28, 27))
    # H=28: total pad 2 → (1, 1); W=27: total 3 → the extra cell goes after (right)
    assert model.layers[0].pads == ((1, 1), (1, 2))
    assert model.layers[0].out_shape == (2, 14, 14)


def test_every_problem_is_reported_at_once_with_its_key():
    found = problems([
        {"type": "conv", "filters": 3},
        {"type": "conv2d", "filter": 3, "kernel": 3, "padding": "smae"},
        {"type": "dense", "units": 0},
    ])
    text = "\n".join(found)
    assert "model.layers[0].type: unknown layer type 'conv' (did you mean 'conv2d'?)" in text
    assert "model.layers[1].filter: unknown key 'filter' (did you mean 'filters'?)" in text
    assert "model.layers[1].padding" in text and "did you mean 'same'" in text
    assert "model.layers[1].filters: required key is missing" in text
    assert "model.layers[2].units" in text and "greater than 0" in text


@pytest.mark.parametrize(
    "layers,expected",
    [
        ([{"type": "conv2d", "filters": "many", "kernel": 3}], "model.layers[0].filters: expected an integer"),
        ([{"type": "conv2d", "filters": -2, "kernel": 3}], "model.layers[0].filters"),
        ([{"type": "conv2d", "filters": 2, "kernel": [3, 0]}], "model.layers[0].kernel: expected an int >= 1"),
        ([{"type": "maxpool", "size": 2, "stride": 0}], "model.layers[0].stride"),
        ([{"type": "dropout", "rate": 1.5}], "model.layers[0].rate"),
        ([{"type": "activation", "fn": "relu7"}], "model.layers[0].fn: expected 'linear'"),
        ([{"type": "conv2d", "filters": 2, "kernel": 3, "activation": "rleu"}], "did you mean 'relu'"),
        ([{"type": "conv2d", "filters": 2, "kernel": 3, "padding": -1}], "model.layers[0].padding"),
        ([{"filters": 2}], "model.layers[0]: a layer needs a 'type'"),
        ([{"type": "conv2d", "filters": 2, "kernel": 3, "bias": "maybe"}], "model.layers[0].bias: expected true or false"),
    ],
)
def test_field_rules(layers, expected):
    assert any(expected in p for p in problems(layers)), problems(layers)


def test_empty_output_names_the_layer_and_the_shapes_so_far():
    found = problems([{"type": "conv2d", "filters": 4, "kernel": 5}, {"type": "maxpool", "size": 30},
                      {"type": "flatten"}, {"type": "dense", "units": 10}])
    assert found == ["model.layers[1]: (maxpool) output would be 4×0×0 for an input of 4×24×24; "
                     "shapes so far 1×28×28 -> 4×24×24"]


def test_dense_on_feature_map_needs_flatten():
    (found,) = problems([{"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "dense", "units": 10}])
    assert "model.layers[1]" in found and "add {type: flatten}" in found


def test_softmax_must_be_last():
    found = problems([{"type": "flatten"}, {"type": "softmax"}, {"type": "dense", "units": 10}])
    assert found == ["model.layers[1]: softmax must be the last layer of the model"]


def test_last_units_must_equal_classes():
    (found,) = problems([{"type": "flatten"}, {"type": "dense", "units": 12}, {"type": "softmax"}])
    assert found.startswith("model.layers[1]: the model outputs 12 values but the dataset has 10 classes")


def test_residual_that_cannot_be_projected():
    (found,) = problems([{"type": "residual", "layers": [{"type": "conv2d", "filters": 4, "kernel": 5}]},
                         {"type": "flatten"}, {"type": "dense", "units": 10}])
    assert found == ("model.layers[0]: (residual) the block maps 1×28×28 to 4×24×24, which a 1×1 stride 1×1 "
                     "shortcut cannot match (4×28×28); use padding: same in the block, or give the shortcut's "
                     "layers (shortcut: [...]); shapes so far 1×28×28")


def test_residual_body_rejects_flatten():
    found = problems([{"type": "residual", "layers": [{"type": "flatten"}]}, {"type": "dense", "units": 10}])
    assert any("model.layers[0].layers[0]: flatten cannot stand inside a residual block" in p for p in found)


def test_header_names_the_file_and_count():
    with pytest.raises(ConfigError) as err:
        compile_layers([{"type": "nope"}, {"type": "nada"}])
    assert str(err.value).startswith("t.yaml has 2 problems")


def test_every_layer_type_has_a_spec_class_with_a_type_default():
    for name, cls in LAYER_TYPES.items():
        assert cls.model_fields["type"].default == name


def test_a_problem_inside_a_residual_body_names_its_nested_key():
    found = problems([{"type": "conv2d", "filters": 4, "kernel": 3},
                      {"type": "residual", "layers": [{"type": "maxpool", "size": 30}]},
                      {"type": "flatten"}, {"type": "dense", "units": 10}])
    assert found == ["model.layers[1].layers[0]: (maxpool) output would be 4×0×0 for an input of 4×26×26; "
                     "shapes so far 1×28×28 -> 4×26×26"]


def test_residual_on_a_vector_is_refused():
    (found,) = problems([{"type": "flatten"}, {"type": "residual", "layers": [{"type": "dropout", "rate": 0.1}]},
                         {"type": "dense", "units": 10}])
    assert found == "model.layers[1]: (residual) residual needs a C×H×W feature map; shapes so far 1×28×28 -> 784"


def test_an_unprojectable_residual_names_the_shortcut_stride_per_axis():
    (found,) = problems([{"type": "residual", "layers": [{"type": "conv2d", "filters": 4, "kernel": 3,
                                                           "stride": [2, 1]}]},
                         {"type": "flatten"}, {"type": "dense", "units": 10}])
    assert "a 1×1 stride 2×1 shortcut cannot match (4×14×28)" in found


@pytest.mark.parametrize(
    "body,stride",
    [
        ([{"type": "conv2d", "filters": 4, "kernel": 3, "stride": [2, 1], "padding": "same"}], (2, 1)),
        ([{"type": "conv2d", "filters": 4, "kernel": 3, "padding": "same"}, {"type": "maxpool", "size": 2}], (2, 2)),
        ([{"type": "residual", "layers": [{"type": "conv2d", "filters": 4, "kernel": 1, "stride": [1, 2]}]},
          {"type": "avgpool", "size": [2, 1]}], (2, 2)),
    ],
    ids=["conv", "pool", "nested"],
)
def test_the_shortcut_stride_is_the_product_of_the_body_strides(body, stride):
    model = compile_layers([{"type": "residual", "layers": body}, {"type": "flatten"}, {"type": "dense", "units": 10}],
                           (2, 8, 8))
    (shortcut,) = model.layers[0].shortcut
    assert shortcut.spec.stride == stride and shortcut.out_shape == model.layers[0].out_shape
    assert shortcut.name == "residual_0/shortcut" and shortcut.pads == ((0, 0), (0, 0))


def test_explicit_padding_per_axis():
    model = compile_layers([{"type": "conv2d", "filters": 2, "kernel": 3, "padding": [1, 2]},
                            {"type": "flatten"}, {"type": "dense", "units": 10}])
    assert model.layers[0].pads == ((1, 1), (2, 2)) and model.layers[0].out_shape == (2, 28, 30)


@pytest.mark.parametrize(
    "layers,expected",
    [
        # conv → flatten → dense: the dense indexes the C×H×W it was flattened from
        ([{"type": "conv2d", "filters": 2, "kernel": 3}, {"type": "flatten"}, {"type": "dense", "units": 10}],
         [None, None, (2, 26, 26)]),
        # a batchnorm on the input map is per channel; so is everything after global pooling
        ([{"type": "batchnorm"}, {"type": "conv2d", "filters": 10, "kernel": 3}, {"type": "global_avgpool"},
          {"type": "dense", "units": 10}], [None, None, None, None]),
        # dropout and activation pass the flattened order through; batchnorm uses it and passes it on; dense ends it
        ([{"type": "flatten"}, {"type": "dropout", "rate": 0.1}, {"type": "activation", "fn": "relu"},
          {"type": "batchnorm"}, {"type": "dense", "units": 12}, {"type": "dense", "units": 10}],
         [None, None, None, (1, 28, 28), (1, 28, 28), None]),
    ],
    ids=["dense", "per-channel", "pass-through"],
)
def test_only_layers_fed_by_a_flatten_know_what_it_flattened(layers, expected):
    assert [layer.flattened_from for layer in compile_layers(layers).layers] == expected


def test_duplicate_layer_names_are_refused_per_list():
    found = problems([{"type": "residual", "layers": [{"type": "conv2d", "filters": 1, "kernel": 1, "name": "c"},
                                                      {"type": "conv2d", "filters": 1, "kernel": 1, "name": "c"}]},
                      {"type": "flatten", "name": "f"}, {"type": "dense", "units": 10, "name": "f"}])
    assert found == ["model.layers[0].layers: layer name 'c' is used more than once",
                     "model.layers: layer name 'f' is used more than once"]


def test_named_layers_keep_their_names():
    model = compile_layers([{"type": "flatten", "name": "flat"}, {"type": "dense", "units": 10, "name": "logits"}])
    assert [layer.name for layer in model.layers] == ["flat", "logits"] and model.name == "t"


def test_residual_body_lists_what_is_allowed():
    from cnnrun.spec.layers import RESIDUAL_BODY_TYPES

    found = problems([{"type": "residual", "layers": [{"type": "flatten"}]}, {"type": "dense", "units": 10}])
    assert found[0] == ("model.layers[0].layers[0]: flatten cannot stand inside a residual block; allowed: "
                        + ", ".join(RESIDUAL_BODY_TYPES))


def test_wrong_class_count_names_the_last_layer_with_units():
    (found,) = problems([{"type": "flatten"}, {"type": "dense", "units": 12}, {"type": "dropout", "rate": 0.5},
                         {"type": "activation", "fn": "relu"}])
    assert found == ("model.layers[1]: the model outputs 12 values but the dataset has 10 classes; "
                     "end with {type: dense, units: ${dataset.num_classes}}")


@pytest.mark.parametrize(
    "layers",
    [
        [{"type": "softmax"}, {"type": "flatten"}],  # a structure problem
        [{"type": "conv2d", "filters": 1, "kernel": 40}],  # a shape problem
        [{"type": "flatten"}, {"type": "dense", "units": 3}],  # the class count
    ],
    ids=["structure", "shape", "classes"],
)
def test_every_kind_of_problem_is_headed_by_its_source(layers):
    with pytest.raises(ConfigError) as err:
        compile_layers(layers)
    assert str(err.value).startswith("t.yaml has 1 problem\n")
    with pytest.raises(ConfigError) as err:
        compile_model({"name": "t", "layers": layers}, (1, 28, 28), 10)
    assert str(err.value).startswith("model has 1 problem\n")


def test_a_misspelt_top_level_key_gets_a_suggestion():
    with pytest.raises(ConfigError) as err:
        compile_model({"name": "t", "layer": [{"type": "flatten"}]}, (1, 28, 28), 10)
    assert "model.layer: unknown key 'layer' (did you mean 'layers'?)" in str(err.value)


def test_the_resolved_spec_leaves_out_unset_options():
    """It is what checkpoints store and resume compares: unset names and descriptions must not appear as null."""
    spec = compile_layers([{"type": "flatten"}, {"type": "dense", "units": 10}]).spec
    assert spec["name"] == "t" and "description" not in spec
    assert all(None not in layer.values() and "name" not in layer for layer in spec["layers"])


@pytest.mark.parametrize(
    "pool,axis,which",
    [
        ({"type": "maxpool", "size": 2, "stride": 2, "padding": 2}, "height", "first"),
        ({"type": "avgpool", "size": 1, "padding": 1}, "height", "first"),
        ({"type": "maxpool", "size": 1, "stride": 3, "padding": [0, 1]}, "width", "first"),
        ({"type": "avgpool", "size": [3, 2], "stride": 5, "padding": [2, 2]}, "width", "first"),
    ],
)
def test_pool_padding_that_leaves_a_window_without_real_cells_is_refused(pool, axis, which):
    (found,) = problems([{"type": "conv2d", "filters": 2, "kernel": 1}, pool, {"type": "flatten"},
                         {"type": "dense", "units": 10}], (1, 4, 4))
    assert found.startswith(f"model.layers[1]: ({pool['type']}) padding ")
    assert f"on the {axis} axis" in found and f"leaves the {which} window with padding only" in found
    assert "padding must be smaller than size" in found and found.endswith("shapes so far 1×4×4 -> 2×4×4")


def test_pool_padding_inside_a_residual_body_is_refused_too():
    found = problems([{"type": "residual", "layers": [{"type": "maxpool", "size": 1, "stride": 1, "padding": 1}]},
                      {"type": "flatten"}, {"type": "dense", "units": 10}], (1, 4, 4))
    assert found and found[0].startswith("model.layers[0].layers[0]: (maxpool) padding 1 on the height axis")


@pytest.mark.parametrize(
    "pool",
    [
        {"type": "maxpool", "size": 2, "stride": 2, "padding": 1},
        {"type": "avgpool", "size": 3, "stride": 5, "padding": 2},  # stride > size, padding < size
        {"type": "maxpool", "size": 2, "stride": 3, "padding": "same"},
        {"type": "avgpool", "size": 1, "stride": 3, "padding": "same"},
    ],
)
def test_pool_padding_smaller_than_the_window_compiles(pool):
    compile_layers([pool, {"type": "flatten"}, {"type": "dense", "units": 10}], (1, 4, 4))


def test_a_padded_average_pool_knows_each_windows_share_of_real_cells():
    """What every backend multiplies its zero-padded average by (window area / real cells under each window); None
    where no window reaches padding, and for layers without windows."""
    import numpy as np

    model = compile_layers([{"type": "avgpool", "size": [3, 2], "stride": [2, 1], "padding": 1},  # 6×4 → 3×5
                            {"type": "avgpool", "size": 2},  # valid: → 1×2
                            {"type": "avgpool", "size": [1, 2], "padding": "same"},  # same, but no padding: → 1×1
                            {"type": "flatten"}, {"type": "dense", "units": 10}], (1, 6, 4))
    padded, valid, same, _, dense = model.layers
    # The windows start at rows -1, 1, 3 of 0-5 and at columns -1 … 3 of 0-3; the real cells under each, per axis:
    rows, columns = [2, 3, 3], [1, 2, 2, 2, 1]
    np.testing.assert_array_equal(padded.real_cell_scale(), (6 / np.outer(rows, columns)).astype(np.float32))
    assert padded.real_cell_scale().dtype == np.float32
    assert valid.real_cell_scale() is same.real_cell_scale() is dense.real_cell_scale() is None


def test_empty_window_checks_the_first_and_the_last_window_of_every_pooling_geometry():
    from cnnrun.spec.shapes import empty_window, output_size, pad_amounts

    for n in range(1, 9):
        for k in range(1, 5):
            for s in range(1, 6):
                for p in [*range(0, 6), "same", "valid"]:
                    out = output_size(n, k, s, p)
                    if out <= 0:
                        continue
                    before, _ = pad_amounts(n, k, s, p)
                    starts = [i * s - before for i in range(out)]
                    empty = [st for st in starts if st + k - 1 < 0 or st > n - 1]
                    assert (empty_window(n, k, s, p) is not None) == bool(empty), (n, k, s, p)
                    if p in ("same", "valid"):
                        assert not empty
