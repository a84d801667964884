"""Storage of the Numba CPU backend: loads, stores and the compute type.

What a kernel loads, stores and computes in is chosen at compile time by the
dtype of its arrays, through small overloaded helpers: ``_ld`` loads an
element in the compute type, ``_st`` rounds a result once into the storage
type, ``_ct`` casts a float64 per-channel scalar to the compute type of a
value, ``_cz`` is zero in the compute type of an array, ``_center`` forms
``x - mean`` accurately, ``_gate`` and ``_relu`` apply the fused ReLU (or
nothing, when their bound is None).

* float32 and float64 storage compute in float64;
* float16 (viewed as uint16 bit patterns) and bfloat16 (viewed as int16)
  compute in float32. float16 converts with LLVM's ``half`` type
  (``vcvtph2ps``/``vcvtps2ph``) when the CPU numba compiles for has F16C,
  else with branch-free integer code; bfloat16 with integer code.

The overloads have no fastmath flags of their own (``_gate`` excepted), so
LLVM never reassociates the split centring ``(x - hi) - lo``.
"""

import platform

import numpy as np
from llvmlite import ir as llvm_ir
from numba import carray, njit
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload, register_jitable

from ._config import FASTMATH, JIT, JITABLE, _has_f16c

_F16C = _has_f16c()


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of an integer."""
    if not isinstance(bits, nbtypes.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, llvm_ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, llvm_ir.IntType(32))
        return builder.bitcast(value, llvm_ir.FloatType())
    return nbtypes.float32(bits), codegen


@intrinsic
def _f32_bits(typingctx, value):
    """The bit pattern of a float32, as uint32."""
    if value != nbtypes.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))
    return nbtypes.uint32(value), codegen


@intrinsic
def _half_to_f32_f16c(typingctx, bits):
    """IEEE binary16 bits -> float32 (LLVM fpext: vcvtph2ps with F16C)."""
    if bits != nbtypes.uint16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], llvm_ir.HalfType())
        return builder.fpext(half, llvm_ir.FloatType())
    return nbtypes.float32(bits), codegen


@intrinsic
def _f32_to_half_f16c(typingctx, value):
    """float32 -> IEEE binary16 bits, round to nearest even (LLVM fptrunc:
    vcvtps2ph with F16C)."""
    if value != nbtypes.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], llvm_ir.HalfType())
        return builder.bitcast(half, llvm_ir.IntType(16))
    return nbtypes.uint16(value), codegen


@njit(**JIT)
def _half_to_f32_soft(bits):
    """IEEE binary16 bits -> float32, integer code (no F16C needed)."""
    h = np.int64(bits) & 0xFFFF
    sign = (h & 0x8000) << 16
    em = h & 0x7FFF
    out = (em << 13) + 0x38000000                   # normal: rebias 15 -> 127
    if em >= 0x7C00:
        out = (em << 13) | 0x7F800000               # inf, NaN (payload kept)
    if em < 0x400:                                  # zero, subnormal: em * 2**-24
        out = np.int64(_f32_bits(np.float32(em) * np.float32(5.960464477539063e-08)))
    return _f32_from_bits(out | sign)


@njit(**JIT)
def _f32_to_half_soft(value):
    """float32 -> IEEE binary16 bits, round to nearest even, integer code."""
    b = np.int64(_f32_bits(value))
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    # normal: rebias 127 -> 15, add half an ulp (minus one when the kept lsb is even)
    out = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    if a < 0x38800000:
        # |value| < 2**-14: adding 0.5 puts binary16's subnormal ulp (2**-24)
        # in float32's last place, so the FPU rounds to nearest even
        out = np.int64(_f32_bits(_f32_from_bits(a) + np.float32(0.5))) - 0x3F000000
    if a >= 0x47800000:                             # |value| >= 65536: inf
        out = 0x7C00
    if a > 0x7F800000:                              # NaN: quiet, top of the payload
        out = 0x7E00 | ((a >> 13) & 0x3FF)
    return np.uint16(out | sign)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits (int16) -> float32: the upper half of the float32."""
    if bits != nbtypes.int16:
        return None

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), i32(16))
        return builder.bitcast(wide, llvm_ir.FloatType())
    return nbtypes.float32(bits), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    """float32 -> bfloat16 bits (int16), round to nearest even; NaN stays a
    quiet NaN. 32-bit integer IR, so that it vectorizes 8 or 16 wide."""
    if value != nbtypes.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        upper = builder.lshr(bits, i32(16))
        # + 0x7fff + lsb of the kept half: ties go to the even neighbour
        rounded = builder.add(builder.add(bits, i32(0x7FFF)),
                              builder.and_(upper, i32(1)))
        result = builder.lshr(rounded, i32(16))
        quiet_nan = builder.or_(upper, i32(0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        result = builder.select(is_nan, quiet_nan, result)
        return builder.trunc(result, llvm_ir.IntType(16))
    return nbtypes.int16(value), codegen


if _F16C:
    _half_to_f32 = _half_to_f32_f16c
    _f32_to_half = _f32_to_half_f16c
else:
    _half_to_f32 = _half_to_f32_soft
    _f32_to_half = _f32_to_half_soft


def _ld(value):
    """A stored element in the compute type."""


def _st(arr, index, value):
    """arr[index] = value, rounded once to the storage type."""


def _ct(value, like):
    """A float64 scalar (or None) in the type of the compute-type value ``like``."""


def _cz(arr):
    """Zero in the compute type of ``arr``'s storage."""


def _center(value, p):
    """``value - p`` (value in the compute type, p float64), accurate."""


def _zero(value):
    """Zero of a scalar's own type."""


def _is16(dtype):
    return dtype in (nbtypes.uint16, nbtypes.int16)


@overload(_ld)
def _ld_impl(value):
    if value == nbtypes.uint16:
        return lambda value: _half_to_f32(value)
    if value == nbtypes.int16:
        return lambda value: _bf16_to_f32(value)
    if value == nbtypes.float32:
        return lambda value: np.float64(value)
    if value == nbtypes.float64:
        return lambda value: value
    return None


@overload(_st)
def _st_impl(arr, index, value):
    if arr.dtype == nbtypes.uint16:
        def store(arr, index, value):
            arr[index] = _f32_to_half(np.float32(value))
    elif arr.dtype == nbtypes.int16:
        def store(arr, index, value):
            arr[index] = _f32_to_bf16(np.float32(value))
    else:
        def store(arr, index, value):
            arr[index] = value
    return store


@overload(_ct)
def _ct_impl(value, like):
    if isinstance(value, nbtypes.NoneType):
        return lambda value, like: None
    if like == nbtypes.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


@overload(_cz)
def _cz_impl(arr):
    if _is16(arr.dtype):
        return lambda arr: np.float32(0.0)
    return lambda arr: 0.0


@overload(_zero)
def _zero_impl(value):
    if value == nbtypes.float32:
        return lambda value: np.float32(0.0)
    return lambda value: 0.0


@overload(_center)
def _center_impl(value, p):
    if value == nbtypes.float32:
        def center(value, p):
            # split p = hi + lo in float32: x - hi is exact when x is near
            # hi (a channel whose mean is far larger than its spread)
            hi = np.float32(p)
            lo = np.float32(p - np.float64(hi))
            return (value - hi) - lo
        return center
    return lambda value, p: value - p


def _gate(u, dv, gq, gr, floor):
    """The ReLU mask: u where y = dv * gq + gr (the forward's arithmetic) is
    > floor, else 0 (NaN y: 0); floor None (no ReLU): u, nothing computed."""


def _relu(y, lo):
    """max(y, lo), NaN kept; lo None (no ReLU): y."""


@overload(_gate, jit_options=dict(fastmath=FASTMATH))
def _gate_impl(u, dv, gq, gr, floor):
    if isinstance(floor, nbtypes.NoneType):
        return lambda u, dv, gq, gr, floor: u

    def gate(u, dv, gq, gr, floor):
        return u if dv * gq + gr > floor else _zero(u)
    return gate


@overload(_relu)
def _relu_impl(y, lo):
    if isinstance(lo, nbtypes.NoneType):
        return lambda y, lo: y
    return lambda y, lo: lo if y < lo else y


# A read-only prefetch of a row a kernel will stream from memory soon:
# the fused forward visits a channel's rows (a, c), (a + 1, c), ... which
# lie C*B elements apart, and the hardware prefetcher stops at page
# boundaries. (The fused backward, which streams dy and x, measured no
# gain from it.)
_PTR_SUFFIX = "p0" if str(llvm_ir.IntType(8).as_pointer()) == "ptr" else "p0i8"


def _array_and_index(arr, index):
    """Whether an intrinsic's arguments are a 1-D array and an integer index."""
    return (isinstance(arr, nbtypes.Array) and arr.ndim == 1
            and isinstance(index, nbtypes.Integer))


def _element_pointer(context, builder, array_type, array, index):
    """In generated code: the pointer to ``array[index]`` of a 1-D array."""
    struct = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, struct, [index],
                                    wraparound=False)


@intrinsic
def _prefetch(typingctx, arr, index):
    """llvm.prefetch (read, keep in all cache levels) of &arr[index]."""
    if not _array_and_index(arr, index):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        i8p = llvm_ir.IntType(8).as_pointer()
        i32 = llvm_ir.IntType(32)
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty,
                                            "llvm.prefetch." + _PTR_SUFFIX)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return nbtypes.none(arr, index), codegen


@register_jitable(**JITABLE)
def _prefetch_seg(seg):
    """Prefetch every cache line of a contiguous segment."""
    step = max(1, 64 // seg.itemsize)
    for j in range(0, seg.shape[0], step):
        _prefetch(seg, j)


# Streaming (non-temporal) stores: a kernel computes each cache line of a
# row into a one-line buffer (in L1) and writes it with a store that
# bypasses the caches, so that the output does not evict data the kernel
# reads again (the fused kernels' slab) and no line is read before it is
# written. Only whole, aligned lines are streamed; the partial lines at a
# row's ends take plain stores, so that no line is written partly each
# way. The stores are weakly ordered: a work item ends with _stream_fence.
LINE_BYTES = 64
_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _address(typingctx, arr, index):
    """The address of ``arr[index]``, as an integer."""
    if not _array_and_index(arr, index):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.ptrtoint(ptr, context.get_value_type(nbtypes.intp))
    return nbtypes.intp(arr, index), codegen


@intrinsic
def _stream_line(typingctx, dst, i, src, k):
    """Copy one cache line (LINE_BYTES) from ``&src[k]`` to ``&dst[i]`` with
    non-temporal stores; ``&dst[i]`` must be line-aligned. (One vector
    store in the IR; LLVM splits it into the target's widest.)"""
    if not (_array_and_index(dst, i) and _array_and_index(src, k)):
        return None

    def codegen(context, builder, signature, args):
        to_ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        from_ptr = _element_pointer(context, builder, signature.args[2], args[2], args[3])
        line = llvm_ir.VectorType(llvm_ir.IntType(64), LINE_BYTES // 8)
        value = builder.load(builder.bitcast(from_ptr, line.as_pointer()), align=1, typ=line)
        store = builder.store(value, builder.bitcast(to_ptr, line.as_pointer()),
                              align=LINE_BYTES)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([llvm_ir.IntType(32)(1)]))
        return context.get_dummy_value()
    return nbtypes.none(dst, i, src, k), codegen


@intrinsic
def _stream_fence(typingctx):
    """A memory fence: this thread's streaming stores are visible after it
    (``sfence`` on x86, which does not wait for them to reach memory)."""
    def codegen(context, builder, signature, args):
        if _X86:
            fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty,
                                                        "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return nbtypes.none(), codegen


@intrinsic
def _pointer(typingctx, address, like):
    """An integer memory address as a pointer to values of ``like``'s type
    (a scalar, whose value is not used)."""
    if not (isinstance(address, nbtypes.Integer) and isinstance(like, nbtypes.Number)):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return nbtypes.CPointer(like)(address, like), codegen


@register_jitable(**JITABLE)
def _view_at(address, like, shape):
    """The C-contiguous array of ``shape`` at a memory address, of ``like``'s
    type. The caller keeps the memory alive and of that size. (Kernels call
    this, not the intrinsic: see :func:`_stream_out`.)"""
    return carray(_pointer(address, like), shape)


@register_jitable(**JITABLE)
def _to_line(arr):
    """Elements of ``arr`` (1-D, contiguous) before its first line-aligned one,
    at most its length: all of them when its elements are not aligned to
    their size (a NumPy array may start at any byte), so that nothing of
    it is streamed."""
    offset = (-_address(arr, 0)) % LINE_BYTES
    if offset % arr.itemsize != 0:
        return arr.shape[0]
    return min(arr.shape[0], offset // arr.itemsize)


@register_jitable(**JITABLE)
def _stream_out(line, out, index):
    """``out[index:index + line.shape[0]] = line`` (one cache line, line-aligned
    in ``out``) with a streaming store. (The loop shapes call this, not the
    intrinsic: an intrinsic pickles with a new id in every process, and a
    kernel whose closure reached one would never hit numba's cache.)"""
    _stream_line(out, index, line, 0)
