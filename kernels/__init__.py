"""Triton kernels of k15sys (installed as ``k15sys.kernels``).

Raw kernels only; autograd functions and backend dispatch live in ``k15sys.ops``.
"""
