"""Triton kernels, imported as ``manifoldgd_fast.kernels``.

Nothing here is imported by the reference path; ``manifoldgd_fast.ops`` is the
only door to these kernels.
"""
