"""Low-level numba intrinsics shared by the kernels."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba import njit
from numba.extending import intrinsic

__all__ = ["address_as_voidptr", "data_address", "memory_fence", "prefetch", "prefetch_elem", "prefetch_l2",
           "prefetch_row", "prefetch_row_l2", "stream_store_line"]


def _emit_prefetch(builder, ptr, locality=3):
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # rw=0 (read), locality (3: into every cache level, prefetcht0 on x86; 2: into L2 and
    # below, prefetcht1), cache type=1 (data)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


def _prefetch_2d(locality):
    def typer(typingctx, table, row, col):
        if not (isinstance(table, types.Array) and table.ndim == 2 and isinstance(row, types.Integer)
                and isinstance(col, types.Integer)):
            return None
        sig = types.void(table, row, col)

        def codegen(context, builder, signature, args):
            aryty, rowty, colty = signature.args
            ary = context.make_array(aryty)(context, builder, args[0])
            r = context.cast(builder, args[1], rowty, types.intp)
            c = context.cast(builder, args[2], colty, types.intp)
            ptr = cgutils.get_item_pointer2(
                context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
                inds=[r, c], wraparound=False, boundscheck=False,
            )
            _emit_prefetch(builder, ptr, locality)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"prefetch_locality{locality}"  # one intrinsic name each
    return typer


prefetch = intrinsic(_prefetch_2d(3))
prefetch.__doc__ = """Software-prefetch the cache line holding ``table[row, col]`` for reading, into
every cache level (L1 included).

``llvm.prefetch`` never faults, so a bad row costs nothing but a wasted hint.
Without it the loop vectorizer turns the bag loop into AVX-512 gathers and runs
about 2.5x slower on uniform ids (DESIGN section 9)."""

prefetch_l2 = intrinsic(_prefetch_2d(2))
prefetch_l2.__doc__ = """:func:`prefetch` into L2 (and the levels below), not L1 (``prefetcht1`` on
x86). A prefetch into L1 holds one of the core's few L1 miss buffers until its line
arrives; one into L2 holds an L2 miss slot, of which there are several times more, so
far more rows are fetched at once. The embedding-bag loops prefetch W rows this way;
the demand load then finds the line in L2."""


@njit(nogil=True, inline="always")
def prefetch_row(table, row):
    """Prefetch every cache line of ``table[row]`` (rows of 256 bytes span four lines;
    prefetching only the first leaves three misses per row to the hardware)."""
    step = 64 // table.itemsize
    for c in range(0, table.shape[1], step):
        prefetch(table, row, c)


@njit(nogil=True, inline="always")
def prefetch_row_l2(table, row):
    """:func:`prefetch_row` into L2 (:func:`prefetch_l2`)."""
    step = 64 // table.itemsize
    for c in range(0, table.shape[1], step):
        prefetch_l2(table, row, c)


@intrinsic
def prefetch_elem(typingctx, arr, i):
    """Software-prefetch the cache line holding ``arr[i]`` of a 1-D array."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
        return None
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        aryty, ity = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], ity, types.intp)
        ptr = cgutils.get_item_pointer2(
            context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
            strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
            inds=[idx], wraparound=False, boundscheck=False,
        )
        _emit_prefetch(builder, ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def memory_fence(typingctx):
    """A sequentially consistent fence (``fence seq_cst``): no load or store moves across
    it, in the compiler or in the CPU. x86 orders stores among themselves and loads among
    themselves anyway; Arm and POWER do not, so a ring shared between processes needs it
    between writing slots and publishing their count (and between the matching reads)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def address_as_voidptr(typingctx, address):
    """The integer ``address`` (``ndarray.ctypes.data``) as a ``void*`` for
    ``numba.carray``: lets one kernel call read a variable number of arrays of other
    objects (the caller keeps them alive and passes their shapes)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.voidptr(address)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], signature.args[0], types.int64)
        return builder.inttoptr(v, ir.IntType(8).as_pointer())

    return sig, codegen


@intrinsic
def data_address(typingctx, arr):
    """The address of ``arr``'s first element, as an integer (to find its alignment)."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.uintp(arr)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, context.get_value_type(types.uintp))

    return sig, codegen


@intrinsic
def stream_store_line(typingctx, dst, dst_byte, src, src_byte):
    """Copy the 64 bytes at byte ``src_byte`` of the 1-D uint8 array ``src`` to byte
    ``dst_byte`` of ``dst`` with a non-temporal store: the line goes to memory without
    being read first (no read-for-ownership) and without evicting anything from the
    caches. The destination address must be a multiple of 64 (the source need not be).
    Non-temporal stores are weakly ordered: a fence (:func:`memory_fence`) must come
    before anything that publishes them to another thread or process."""
    u8 = types.Array(types.uint8, 1, "C")
    if not (dst == u8 and src == u8 and isinstance(dst_byte, types.Integer) and isinstance(src_byte, types.Integer)):
        return None
    sig = types.void(dst, dst_byte, src, src_byte)

    def codegen(context, builder, signature, args):
        line = ir.VectorType(ir.IntType(64), 8)
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        sp = builder.gep(s.data, [context.cast(builder, args[3], signature.args[3], types.intp)])
        dp = builder.gep(d.data, [context.cast(builder, args[1], signature.args[1], types.intp)])
        v = builder.load(builder.bitcast(sp, line.as_pointer()), align=1)
        store = builder.store(v, builder.bitcast(dp, line.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen
