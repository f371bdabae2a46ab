"""What every backend shares around its layer builders: one builder signature, and the model's tensors by
canonical name.

A backend has one builder per layer type, in its ``BUILDERS`` table keyed like :data:`cnnrun.spec.LAYER_TYPES`:
``builder(layer, ctx) -> Built(obj, tensors)`` (Keras's also take the input tensor: ``builder(layer, ctx, x)``,
because a Keras layer creates its weights when first called). ``obj`` is the framework's object for the layer (a
torch module, a TensorFlow op, a Keras output tensor, a Chainer link); ``tensors`` maps the names the spec declares
(``layer.weights`` then ``layer.states``: ``{"kernel": …, "bias": …}``) to the framework's handle for each. A
builder of a layer with children (residual) builds them with ``ctx.build(child)``. :class:`BuildContext` checks
that a builder returned exactly the declared tensors and files them under ``<layer name>/<tensor>``; the layout
conversion (:mod:`cnnrun.layout`) needs nothing more, since each tensor's axes come from its spec.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Tuple

from cnnrun.layout import from_canonical, to_canonical


class Built(NamedTuple):
    obj: Any  # the framework's object for the layer
    tensors: Dict[str, Any] = {}  # the layer's tensor names (as its spec declares them) → framework handles


class BuildContext:
    """Builds compiled layers with a backend's ``BUILDERS`` and collects their tensors.

    A backend passes extra build state (initial values, a random generator, …) as attributes of a subclass or
    keyword arguments: ``BuildContext(BUILDERS, rng=rng)`` makes ``ctx.rng``.
    """

    def __init__(self, builders: Dict[str, Callable[..., Built]], **state: Any):
        self.builders = builders
        self.tensors: Dict[str, Any] = {}  # canonical tensor name → handle, in build order
        self.trainable: List[str] = []  # the canonical names of the weights (not states), in build order
        self.__dict__.update(state)

    def build(self, layer, *inputs: Any) -> Any:
        """The framework object for ``layer`` (its tensors filed under their canonical names)."""
        obj, tensors = self.builders[layer.type](layer, self, *inputs)
        declared = [*layer.weights, *layer.states]
        if sorted(tensors) != sorted(declared):
            raise RuntimeError(f"the {layer.type} builder of {layer.name} returned tensors {sorted(tensors)}; "
                               f"its spec declares {sorted(declared)}")
        for param in declared:
            name = f"{layer.name}/{param}"
            self.tensors[name] = tensors[param]
            if param in layer.weights:
                self.trainable.append(name)
        return obj


def attribute_handles(owner: Any, **attributes: str) -> Dict[str, Tuple[Any, str]]:
    """tensor name → (owner, attribute name) of the framework object holding it, for frameworks whose tensors are
    attributes of a module (torch, Chainer); one set to None (a ``bias: false`` layer's bias) is left out. The pair,
    not the tensor: moving a torch module to a device replaces its buffers."""
    return {name: (owner, attr) for name, attr in attributes.items() if getattr(owner, attr, None) is not None}


def assign_reshaped(variable: Any, value: Any) -> None:
    """``variable.assign(value)`` for a variable that holds its tensor reshaped (same order of values: a depthwise
    kernel canonical (C·M, 1, H, W) is (H, W, C, M) in TensorFlow and Keras); shape-checked as ``assign`` is."""
    variable.assign(value.reshape(tuple(variable.shape)))


def read_canonical(model, layout: str, handles: Dict[str, Any], read: Callable[[Any], Any]) -> Dict[str, Any]:
    """Every tensor in canonical layout: ``read(handle)`` gives the framework's array as NumPy."""
    return to_canonical(model, {name: read(handle) for name, handle in handles.items()}, layout)


def write_canonical(model, layout: str, handles: Dict[str, Any], weights: Dict[str, Any],
                    write: Callable[[Any, Any], None]) -> None:
    """Load canonical ``weights``: ``write(handle, array)`` with each converted to the framework's layout."""
    native = from_canonical(model, weights, layout)
    for name, handle in handles.items():
        write(handle, native[name])


def slot_key(tensor: str, slot: str) -> str:
    """The training-state key of one optimizer slot of a tensor: ``<tensor>/<slot>`` (PyTorch's slot names)."""
    return f"{tensor}/{slot}"


def slots_by_tensor(state: Dict[str, Any], tensors) -> Dict[str, Dict[str, Any]]:
    """``state``'s optimizer slots grouped as tensor → {slot: value}, for the given tensor names only."""
    wanted, grouped = set(tensors), {}
    for key, value in state.items():
        tensor, _, slot = key.rpartition("/")
        if tensor in wanted:
            grouped.setdefault(tensor, {})[slot] = value
    return grouped
