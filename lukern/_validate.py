"""``check_*`` helpers: validate once at the public boundary, with messages that name the
argument, the expectation, what was received and the fix. Kernels never validate."""

from __future__ import annotations

import numpy as np

from ._kernels.checks import first_decrease, min_max

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_array(name: str, x, ndim: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"`{name}` must be a numpy.ndarray; got {type(x).__name__}. Wrap it with numpy.asarray().")
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D; got shape {x.shape}.")
    return x


def check_table(table, name: str = "table") -> np.ndarray:
    check_array(name, table, 2)
    if table.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32 or float64; got {table.dtype}. Convert once with table.astype(np.float32).")
    if not table.flags.c_contiguous:
        raise ValueError(
            f"`{name}` must be C-contiguous (shape {table.shape}, strides {table.strides}); lukern does not copy "
            f"tables silently. Make one copy up front with numpy.ascontiguousarray({name})."
        )
    return table


def check_indices(indices, n_rows: int | None, *, name: str = "indices", check_range: bool = True) -> np.ndarray:
    check_array(name, indices, 1)
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"`{name}` must be int32 or int64; got {indices.dtype}. Convert with {name}.astype(np.int64).")
    if not indices.flags.c_contiguous:
        raise ValueError(f"`{name}` must be contiguous; got strides {indices.strides}. Use numpy.ascontiguousarray({name}).")
    if check_range and n_rows is not None and indices.size:
        lo, hi = min_max(indices)
        if lo < 0 or hi >= n_rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"`{name}` values must be in [0, {n_rows}); got {'min' if lo < 0 else 'max'} {bad}.")
    return indices


def check_offsets(offsets, n_indices: int, *, name: str = "offsets", n_bags: int | None = None) -> np.ndarray:
    check_array(name, offsets, 1)
    if offsets.dtype not in INDEX_DTYPES:
        raise TypeError(f"`{name}` must be int32 or int64; got {offsets.dtype}. Convert with {name}.astype(np.int64).")
    if not offsets.flags.c_contiguous:
        raise ValueError(f"`{name}` must be contiguous; got strides {offsets.strides}.")
    if offsets.size == 0:
        raise ValueError(f"`{name}` must have n_bags + 1 >= 1 entries (CSR form, starting at 0); got an empty array.")
    if n_bags is not None and offsets.size != n_bags + 1:
        raise ValueError(f"`{name}` must have {n_bags + 1} entries (n_bags + 1); got {offsets.size}.")
    if offsets[0] != 0:
        raise ValueError(f"`{name}[0]` must be 0 (CSR form); got {int(offsets[0])}.")
    if offsets[-1] != n_indices:
        raise ValueError(
            f"`{name}[-1]` must equal len(indices) = {n_indices} (CSR form with n_bags + 1 entries, "
            f"torch's include_last_offset=True); got {int(offsets[-1])}."
        )
    if offsets.size > 1:
        at = first_decrease(offsets)
        if at >= 0:
            raise ValueError(
                f"`{name}` must be non-decreasing; got {name}[{at}] = {int(offsets[at])} > {name}[{at + 1}] = {int(offsets[at + 1])}."
            )
    return offsets


def check_weights(weights, n_indices: int, dtype: np.dtype, *, name: str = "weights") -> np.ndarray:
    check_array(name, weights, 1)
    if weights.dtype != dtype:
        raise TypeError(f"`{name}` must have the table's dtype {dtype}; got {weights.dtype}. Use {name}.astype(table.dtype).")
    if weights.size != n_indices:
        raise ValueError(f"`{name}` must have one entry per index ({n_indices}); got {weights.size}.")
    if not weights.flags.c_contiguous:
        raise ValueError(f"`{name}` must be contiguous; got strides {weights.strides}.")
    return weights


def check_out(out, shape: tuple, dtype: np.dtype, *, name: str = "out") -> np.ndarray:
    check_array(name, out, len(shape))
    if out.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}; got {out.shape}. Pass out=None to allocate.")
    if out.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}; got {out.dtype}.")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"`{name}` must be a writeable C-contiguous array.")
    return out


def check_positive_int(name: str, value, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int{' or None' if allow_none else ''}; got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1; got {value}.")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}; got {value!r}.")
    return value
