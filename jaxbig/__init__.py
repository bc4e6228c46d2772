"""jaxbig: train and benchmark CNNs, RNNs and Transformers in JAX from one experiment file."""

__version__ = '0.1.0'
