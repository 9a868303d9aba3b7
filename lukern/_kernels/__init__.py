"""Numba kernels: ``@njit(nogil=True)``, preallocated outputs, no validation.

Public wrappers in :mod:`lukern` validate once at the boundary and call these.
"""
