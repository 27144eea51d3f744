"""charmlp_fast: a fast trainer for Bengio-style character MLP language models."""
__version__ = "0.1.0"
