"""cnnrun: declarative CNN training across PyTorch, TensorFlow, Keras and Chainer."""

__version__ = "0.1.0"
