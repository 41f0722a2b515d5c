/* emu_warp.cpp: what each warp collective computes once every lane of its mask has arrived.
 * Semantics follow the CUDA C++ Programming Guide (warp shuffle and vote functions) and the PTX
 * ISA for shfl.sync: lanes form segments of `width` lanes; a source outside the caller's segment
 * (up/down/xor) returns the caller's own value; __shfl_sync wraps srcLane modulo width. Reading a
 * lane outside the mask is undefined in CUDA; here it yields all-ones bytes (NaN), so a kernel
 * that depends on it fails visibly instead of working by accident. */
#include <cstdio>

#include "emu_internal.h"

namespace fh_emu {

namespace {

const uint64_t kUndefined = ~0ull;

void check_width(LaneSlot* const* lanes, unsigned mask, const char* op) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    const int w = lanes[l]->width;
    if (w < 1 || w > 32 || (w & (w - 1)))
      report_and_abort("invalid shuffle width", "%s: width %d is not a power of two in [1, 32] (lane %d)", op, w, l);
  }
}

/* `src(lane, arg, width)` returns the source lane, or -1 for "keep your own value". */
template <class Src>
void shuffle_from(LaneSlot* const* lanes, unsigned mask, const char* op, Src src) {
  check_width(lanes, mask, op);
  uint64_t out[32];
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    const int s = src(l, lanes[l]->arg, lanes[l]->width);
    if (s < 0) out[l] = lanes[l]->in;
    else out[l] = (mask >> s & 1) ? lanes[s]->in : kUndefined;
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) lanes[l]->out = out[l];
}

template <class Op>
void reduce(LaneSlot* const* lanes, unsigned mask, Op op) {
  bool first = true;
  uint32_t acc = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    const uint32_t v = (uint32_t)lanes[l]->in;
    acc = first ? v : op(acc, v);
    first = false;
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) lanes[l]->out = acc;
}

} // namespace

void complete_shfl(LaneSlot* const* lanes, unsigned mask) {
  shuffle_from(lanes, mask, "__shfl_sync", [](int l, int src, int w) { return (l & ~(w - 1)) + (src & (w - 1)); });
}
void complete_shfl_up(LaneSlot* const* lanes, unsigned mask) {
  shuffle_from(lanes, mask, "__shfl_up_sync", [](int l, int d, int w) { return (l & (w - 1)) >= d ? l - d : -1; });
}
void complete_shfl_down(LaneSlot* const* lanes, unsigned mask) {
  shuffle_from(lanes, mask, "__shfl_down_sync", [](int l, int d, int w) { return (l & (w - 1)) + d < w ? l + d : -1; });
}
void complete_shfl_xor(LaneSlot* const* lanes, unsigned mask) {
  /* A butterfly partner in a later segment is out of reach; earlier segments are readable. */
  shuffle_from(lanes, mask, "__shfl_xor_sync", [](int l, int m, int w) {
    const int s = l ^ (m & 31);
    return s > (l | (w - 1)) ? -1 : s;
  });
}
void complete_ballot(LaneSlot* const* lanes, unsigned mask) {
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1) && lanes[l]->in) bits |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) lanes[l]->out = bits;
}
void complete_nothing(LaneSlot* const*, unsigned) {}
void complete_reduce_add(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return a + b; });
}
void complete_reduce_min_u(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return a < b ? a : b; });
}
void complete_reduce_max_u(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return a > b ? a : b; });
}
void complete_reduce_min_i(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return (int32_t)a < (int32_t)b ? a : b; });
}
void complete_reduce_max_i(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return (int32_t)a > (int32_t)b ? a : b; });
}
void complete_reduce_and(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return a & b; });
}
void complete_reduce_or(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return a | b; });
}
void complete_reduce_xor(LaneSlot* const* lanes, unsigned mask) {
  reduce(lanes, mask, [](uint32_t a, uint32_t b) { return a ^ b; });
}
void complete_match_any(LaneSlot* const* lanes, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    uint32_t same = 0;
    for (int k = 0; k < 32; ++k)
      if ((mask >> k & 1) && lanes[k]->in == lanes[l]->in) same |= 1u << k;
    lanes[l]->out = same;
  }
}

} // namespace fh_emu

namespace nvcuda {
namespace wmma {
namespace detail {

void check_uniform_ptr(const char* op, ::fh_emu::LaneSlot* const* lanes, size_t elem_bytes);

/* The documented preconditions of load/store_matrix_sync: the same mptr and ldm in every lane,
 * mptr 256-bit aligned, ldm a multiple of 16 bytes. The hardware does not check them; a kernel
 * that violates them reads garbage on a GPU, so here it is a synccheck error. */
void check_uniform_ptr(const char* op, ::fh_emu::LaneSlot* const* lanes, size_t elem_bytes) {
  for (int l = 1; l < 32; ++l)
    if (lanes[l]->p[0] != lanes[0]->p[0] || lanes[l]->ldm != lanes[0]->ldm || lanes[l]->layout != lanes[0]->layout)
      ::fh_emu::report_and_abort("non-uniform WMMA arguments",
                                 "%s: lane %d passes (%p, ldm %u, layout %d), lane 0 passes (%p, ldm %u, layout %d)", op, l,
                                 lanes[l]->p[0], lanes[l]->ldm, lanes[l]->layout, lanes[0]->p[0], lanes[0]->ldm,
                                 lanes[0]->layout);
  if ((uintptr_t)lanes[0]->p[0] % 32 != 0)
    ::fh_emu::report_and_abort("misaligned WMMA pointer", "%s: pointer %p is not 256-bit aligned", op, lanes[0]->p[0]);
  if ((lanes[0]->ldm * elem_bytes) % 16 != 0)
    ::fh_emu::report_and_abort("invalid WMMA ldm", "%s: ldm %u (elements of %zu bytes) is not a multiple of 16 bytes", op,
                               lanes[0]->ldm, elem_bytes);
}

} // namespace detail
} // namespace wmma
} // namespace nvcuda
