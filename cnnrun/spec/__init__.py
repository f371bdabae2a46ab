"""The model spec: typed layers, validation and shape inference."""

from cnnrun.spec.compiler import CompiledLayer, CompiledModel, ModelSpec, compile_model, fmt_shape
from cnnrun.spec.layers import ACTIVATIONS, LAYER_TYPES

__all__ = ["ACTIVATIONS", "LAYER_TYPES", "CompiledLayer", "CompiledModel", "ModelSpec", "compile_model", "fmt_shape"]
