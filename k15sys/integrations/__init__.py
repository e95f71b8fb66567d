"""Adapters that plug k15sys kernels into other libraries (transformers)."""
