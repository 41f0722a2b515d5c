/* emu_sm90_tma.cpp: the twin of cuTensorMapEncodeTiled and the bulk tensor copy
 * cp.async.bulk.tensor.2d (TMA) that reads through it.
 *
 * cuTensorMapEncodeTiled validates like the driver's documentation says (cuda.h, the function's
 * comment): map 64-byte aligned; rank 1..5; global address 16-byte aligned; every dimension in
 * [1, 2^32]; strides multiples of 16, below 2^40, each at least the previous one times its
 * dimension; box dimensions in [1, 256] with the inner one a multiple of 16 bytes; element
 * strides in [1, 8]; a swizzle's span at least the box's inner size in bytes. It returns
 * CUDA_ERROR_INVALID_VALUE otherwise, as the driver does. Interleaved layouts, packed types and
 * the 128B_ATOM swizzles are not modelled (the error says so).
 *
 * The copy (PTX ISA, "cp.async.bulk.tensor"; tensor-copy semantics in "Tensor Access Modes" /
 * "Bounding Box"): the box at the given coordinates, elements outside the tensor filled with
 * zero (or NaN with FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA), laid out densely in shared memory (box
 * row r at r * inner bytes) with the swizzle applied to the shared address, and complete_tx of
 * the whole box's bytes (filled ones included) on the mbarrier. The destination is poisoned at
 * issue; the data lands at a random later point (emu_sm90.cpp). */
#include <cuda.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "emu_ptx.h"
#include "emu_sm90_state.h"

namespace fh_emu {
namespace sm90 {

namespace {

int elem_size(int dtype) {
  switch (dtype) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0; /* packed 4/6-bit types: not modelled */
  }
}

bool is_float(int dtype) {
  return dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || dtype == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ||
         dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 || dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ ||
         dtype == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32 || dtype == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ ||
         dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT64;
}

/* The driver returns the error without a message; the twin says why on stderr when
 * FH_EMU_TMAP_VERBOSE is set, so a test log can show which rule failed. */
CUresult invalid(const char* why) {
  if (std::getenv("FH_EMU_TMAP_VERBOSE")) std::fprintf(stderr, "fh_emu cuTensorMapEncodeTiled: %s\n", why);
  return CUDA_ERROR_INVALID_VALUE;
}

} // namespace

void tma_fill(const Bulk& b) {
  const TensorMapTwin& m = b.map;
  const uint32_t es = m.esize, inner = (uint32_t)m.box[0] * es;
  const uint32_t rows = (m.box[1] + m.estride[1] - 1) / m.estride[1];
  const unsigned char* g = reinterpret_cast<const unsigned char*>((uintptr_t)m.addr);
  unsigned char nan_fill[8];
  std::memset(nan_fill, 0, sizeof nan_fill);
  if (m.oob_nan) {
    /* canonical quiet NaN of the element type */
    if (m.dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT16) { const uint16_t v = 0x7e00; std::memcpy(nan_fill, &v, 2); }
    else if (m.dtype == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16) { const uint16_t v = 0x7fc0; std::memcpy(nan_fill, &v, 2); }
    else if (es == 4) { const uint32_t v = 0x7fc00000u; std::memcpy(nan_fill, &v, 4); }
    else { const uint64_t v = 0x7ff8000000000000ull; std::memcpy(nan_fill, &v, 8); }
  }
  for (uint32_t r = 0; r < rows; ++r) {
    const int64_t y = (int64_t)b.c1 + (int64_t)r * m.estride[1];
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const int64_t x = (int64_t)b.c0 + e;
      const uint32_t lin = r * inner + e * es;
      unsigned char* dst = b.dst + (swizzle(b.dst_off + lin, m.swizzle_bytes) - b.dst_off);
      if (x >= 0 && y >= 0 && (uint64_t)x < m.dim[0] && (uint64_t)y < m.dim[1])
        std::memcpy(dst, g + (uint64_t)y * m.stride[1] + (uint64_t)x * es, es);
      else
        std::memcpy(dst, nan_fill, es);
    }
  }
}

} // namespace sm90

using namespace sm90;

void sm90_tma_load_2d(void* dst, const void* tmap, int32_t c0, int32_t c1, void* bar, uint16_t cta_mask,
                      bool multicast) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  const char* op = "cp.async.bulk.tensor.2d";
  if ((uintptr_t)tmap % 64)
    ptx::fail("invalid tensor map operand", t, "%s: the tensor map at %p is not 64-byte aligned", op, tmap);
  TensorMapTwin m;
  std::memcpy(&m, tmap, sizeof m);
  if (m.magic != kTmapMagic)
    ptx::fail("invalid tensor map operand", t, "%s: %p is not a tensor map made by cuTensorMapEncodeTiled (pass the "
              "CUtensorMap itself, a __grid_constant__ kernel parameter)", op, tmap);
  if (m.rank != 2)
    ptx::fail("invalid tensor map operand", t, "%s: the tensor map has rank %d; the .2d copy needs rank 2", op, m.rank);
  const uint32_t all = (1u << cluster_size()) - 1u;
  if (multicast && (cta_mask == 0 || (cta_mask & ~all)))
    ptx::fail("invalid multicast mask", t, "%s.multicast::cluster: ctaMask 0x%04x must name CTAs of the cluster, which "
              "has %d CTA%s (mask 0x%04x)", op, cta_mask, cluster_size(), cluster_size() > 1 ? "s" : "", all);
  const uint32_t off = sm90_smem_offset(dst);
  /* The swizzle is a function of the shared address; the twin asks for stages aligned to the
   * pattern's repeat (8 rows of the span), as kernels do, and 128 bytes without a swizzle. */
  const uint32_t align = m.swizzle_bytes ? 8u * m.swizzle_bytes : 128u;
  if (off % align)
    ptx::fail("misaligned bulk copy destination", t, "%s: shared destination at offset %u is not %u-byte aligned%s", op,
              off, align, m.swizzle_bytes ? " (the swizzle pattern's repeat)" : "");
  const uint32_t rows = (m.box[1] + m.estride[1] - 1) / m.estride[1];
  const uint32_t bytes = (uint32_t)m.box[0] * m.esize * rows;
  ptx::locate(s, dst, (int)bytes, op, t);
  ptx::check_aligned(bar, 8, op, "mbarrier", t);
  /* Each destination CTA (this one alone without multicast) gets its own copy in flight, in its
   * own twin state: it lands there, at the same offsets, and completes on that CTA's mbarrier. */
  const uint32_t targets = multicast ? (uint32_t)cta_mask : 1u << cluster_rank();
  for (int r = 0; r < cluster_size(); ++r) {
    if (!(targets >> r & 1u)) continue;
    const bool me = r == cluster_rank();
    PtxState& rs = me ? s : remote_state((uint32_t)r, op, t);
    unsigned char* d = me ? static_cast<unsigned char*>(dst) : member_smem(r) + off;
    void* rbar = me ? bar : member_smem(r) + remote_offset(bar, (uint32_t)r, op, t);
    Mbar* mb = find_bar_in(st_of(rs), rbar);
    if (!mb)
      ptx::fail("copy completes on an uninitialized mbarrier", t, "%s: no mbarrier.init for %s%s", op,
                bar_name(rs, rbar).c_str(), r == cluster_rank() ? "" : (" in the CTA of cluster rank " + std::to_string(r)).c_str());
    check_bulk(rs, t, d, (int)bytes, true, "cp.async.bulk.tensor destination");
    Bulk b{d, off, bytes, rbar, m, c0, c1, t, mb->phase, cluster_rank()};
    std::memset(d, 0xff, bytes); /* poisoned (NaN) until it lands */
    ptx::note_async_write(rs, d, bytes); /* through the async proxy: no proxy fence needed */
    st_of(rs).bulks.push_back(b);
    ++rs.bulk_inflight;
  }
  /* Global bytes read, once however many CTAs receive the box: the box's elements inside the
   * tensor (the out-of-bound fill reads nothing), counted as cp.async counts its src-size, and
   * those inside the watched range. */
  fh_emu_counters_t& c = worker_counters();
  const unsigned char* g = reinterpret_cast<const unsigned char*>((uintptr_t)m.addr);
  const int64_t x0 = std::max<int64_t>(c0, 0), x1 = std::min<int64_t>((int64_t)c0 + m.box[0], (int64_t)m.dim[0]);
  for (uint32_t r = 0; r < rows && x1 > x0; ++r) {
    const int64_t y = (int64_t)c1 + (int64_t)r * m.estride[1];
    if (y < 0 || (uint64_t)y >= m.dim[1]) continue;
    const int n = (int)((x1 - x0) * m.esize);
    c.bytes_g2s += (uint64_t)n;
    c.bytes_g2s_watched += watched_overlap(g + (uint64_t)y * m.stride[1] + (uint64_t)x0 * m.esize, n);
  }
  maybe_yield();
}

} // namespace fh_emu

extern "C" CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType,
                                                   cuuint32_t tensorRank, void* globalAddress,
                                                   const cuuint64_t* globalDim, const cuuint64_t* globalStrides,
                                                   const cuuint32_t* boxDim, const cuuint32_t* elementStrides,
                                                   CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                                   CUtensorMapL2promotion l2Promotion,
                                                   CUtensorMapFloatOOBfill oobFill) {
  using fh_emu::sm90::TensorMapTwin;
  using fh_emu::sm90::invalid;
  static_assert(sizeof(TensorMapTwin) <= sizeof(CUtensorMap), "the twin must fit the opaque map");
  if (!tensorMap || (uintptr_t)tensorMap % 64) return invalid("tensorMap is not 64-byte aligned");
  const int es = fh_emu::sm90::elem_size((int)tensorDataType);
  if (es == 0) return invalid("data type unknown or packed (packed types are not modelled)");
  if (tensorRank < 1 || tensorRank > 5) return invalid("tensorRank must be in [1, 5]");
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return invalid("interleaved layouts are not modelled");
  if (!globalAddress || (uintptr_t)globalAddress % 16) return invalid("globalAddress is not 16-byte aligned");
  if (!globalDim || !boxDim || !elementStrides || (tensorRank > 1 && !globalStrides)) return invalid("null array");
  for (cuuint32_t i = 0; i < tensorRank; ++i)
    if (globalDim[i] == 0 || globalDim[i] > (1ull << 32)) return invalid("globalDim must be in [1, 2^32]");
  for (cuuint32_t i = 0; i + 1 < tensorRank; ++i) {
    if (globalStrides[i] % 16) return invalid("globalStrides must be multiples of 16 bytes");
    if (globalStrides[i] >= (1ull << 40)) return invalid("globalStrides must be below 2^40");
    const unsigned __int128 prev = i == 0 ? (unsigned __int128)globalDim[0] * (unsigned)es
                                          : (unsigned __int128)globalStrides[i - 1] * globalDim[i];
    if ((unsigned __int128)globalStrides[i] < prev)
      return invalid("globalStrides[i] must cover the previous dimension (stride[i-1] * dim[i])");
  }
  for (cuuint32_t i = 0; i < tensorRank; ++i) {
    if (boxDim[i] == 0 || boxDim[i] > 256) return invalid("boxDim must be in [1, 256]");
    if (elementStrides[i] == 0 || elementStrides[i] > 8) return invalid("elementStrides must be in [1, 8]");
  }
  const uint64_t inner = (uint64_t)boxDim[0] * (unsigned)es;
  if (inner % 16) return invalid("boxDim[0] * element size must be a multiple of 16 bytes");
  uint32_t span = 0;
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: span = 0; break;
    case CU_TENSOR_MAP_SWIZZLE_32B: span = 32; break;
    case CU_TENSOR_MAP_SWIZZLE_64B: span = 64; break;
    case CU_TENSOR_MAP_SWIZZLE_128B: span = 128; break;
    default: return invalid("swizzle mode not modelled (the 128B_ATOM variants)");
  }
  if (span && inner > span) return invalid("the box's inner dimension in bytes exceeds the swizzle span");
  if ((int)l2Promotion < 0 || (int)l2Promotion > (int)CU_TENSOR_MAP_L2_PROMOTION_L2_256B)
    return invalid("l2Promotion out of range");
  if (oobFill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE && oobFill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA)
    return invalid("oobFill out of range");
  if (oobFill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && !fh_emu::sm90::is_float((int)tensorDataType))
    return invalid("the NaN out-of-bounds fill needs a floating-point data type");
  TensorMapTwin m;
  std::memset(&m, 0, sizeof m);
  m.magic = fh_emu::sm90::kTmapMagic;
  m.dtype = (uint8_t)tensorDataType;
  m.rank = (uint8_t)tensorRank;
  m.esize = (uint8_t)es;
  m.swizzle_bytes = (uint8_t)span;
  m.oob_nan = oobFill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA;
  m.addr = (uint64_t)(uintptr_t)globalAddress;
  m.stride[0] = (uint64_t)es;
  for (cuuint32_t i = 0; i < 5; ++i) {
    m.dim[i] = i < tensorRank ? globalDim[i] : 1;
    m.box[i] = (uint16_t)(i < tensorRank ? boxDim[i] : 1);
    m.estride[i] = (uint8_t)(i < tensorRank && i > 0 ? elementStrides[i] : 1);
    if (i > 0) m.stride[i] = i < tensorRank ? globalStrides[i - 1] : m.stride[i - 1] * m.dim[i - 1];
  }
  std::memset(tensorMap, 0, sizeof *tensorMap);
  std::memcpy(tensorMap, &m, sizeof m);
  return CUDA_SUCCESS;
}
