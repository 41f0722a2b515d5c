/* emu_wmma.h: nvcuda::wmma for the SIMT emulator (included by emu_device.h).
 *
 * The CUDA programming guide leaves the mapping of fragment elements to lanes unspecified, so a
 * correct kernel may only (a) load/store fragments with load_matrix_sync/store_matrix_sync,
 * (b) run mma_sync, and (c) apply the same element-wise operation to every x[i]. The emulator's
 * own layout is therefore as faithful as the hardware's: lane l holds the elements with
 * row-major index l + 32*i of the logical matrix (matrix_a: M x K, matrix_b: K x N,
 * accumulator: M x N). A kernel that relies on a particular hardware layout breaks here.
 *
 * Every fragment operation but fill_fragment is warp-collective: all 32 lanes of a full warp
 * must call it with the same pointer and ldm (checked). Pointers must be 256-bit aligned and ldm
 * a multiple of 16 bytes, as documented (checked). mma_sync multiplies exactly (fp16/bf16
 * products are exact in fp32; tf32 inputs are truncated to 10 mantissa bits, which is what the
 * hardware reads of an unconverted fp32) and accumulates in fp32 in k order: the hardware's
 * internal rounding/ordering is not modelled. */
#ifndef FH_EMU_WMMA_H
#define FH_EMU_WMMA_H

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
} // namespace precision

namespace detail {
template <class T> struct storage { typedef T type; };
template <> struct storage<precision::tf32> { typedef float type; };

template <class Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { enum { rows = M, cols = K }; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { enum { rows = K, cols = N }; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { enum { rows = M, cols = N }; };

inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> inline T from_f(float x);
template <> inline float from_f<float>(float x) { return x; }
template <> inline __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/* What the tensor core reads of a tf32 operand: the top 19 bits of the fp32 pattern. */
inline float tf32_truncate(float x) {
  uint32_t b = (uint32_t)::fh_emu::to_bits(x);
  if ((b & 0x7f800000u) != 0x7f800000u) b &= 0xffffe000u;
  return ::fh_emu::from_bits<float>(b);
}
} // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
 public:
  typedef typename detail::storage<T>::type element_type;
  typedef element_type storage_element_type;
  enum { rows = detail::shape<Use, M, N, K>::rows, cols = detail::shape<Use, M, N, K>::cols };
  static_assert((rows * cols) % 32 == 0, "fragment must spread evenly over 32 lanes");
  enum { num_elements = rows * cols / 32 };
  element_type x[num_elements];
};

/* Round to tf32 as cvt.rna.tf32.f32 does: to nearest, ties away from zero, 10 mantissa bits. */
inline float __float_to_tf32(float x) {
  uint32_t b = (uint32_t)::fh_emu::to_bits(x);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;
  return ::fh_emu::from_bits<float>(b);
}

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const typename fragment<Use, M, N, K, T, L>::element_type& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

namespace detail {
void check_uniform_ptr(const char* op, ::fh_emu::LaneSlot* const* lanes, size_t elem_bytes);

/* Memory offset of logical element (r, c) for a row-major or column-major layout. */
inline size_t mem_offset(int r, int c, unsigned ldm, bool row_major_mem) {
  return row_major_mem ? (size_t)r * ldm + c : (size_t)c * ldm + r;
}

template <class Frag, class S>
void complete_load(::fh_emu::LaneSlot* const* lanes, unsigned) {
  check_uniform_ptr("wmma::load_matrix_sync", lanes, sizeof(S));
  const S* src = static_cast<const S*>(lanes[0]->p[0]);
  const unsigned ldm = lanes[0]->ldm;
  const bool row_mem = lanes[0]->layout == mem_row_major;
  for (int l = 0; l < 32; ++l) {
    Frag* f = static_cast<Frag*>(const_cast<void*>(lanes[l]->p[1]));
    for (int i = 0; i < Frag::num_elements; ++i) {
      const int idx = l + 32 * i;
      f->x[i] = src[mem_offset(idx / Frag::cols, idx % Frag::cols, ldm, row_mem)];
    }
  }
}

template <class Frag, class S>
void complete_store(::fh_emu::LaneSlot* const* lanes, unsigned) {
  check_uniform_ptr("wmma::store_matrix_sync", lanes, sizeof(S));
  S* dst = static_cast<S*>(const_cast<void*>(lanes[0]->p[0]));
  const unsigned ldm = lanes[0]->ldm;
  const bool row_mem = lanes[0]->layout == mem_row_major;
  for (int l = 0; l < 32; ++l) {
    const Frag* f = static_cast<const Frag*>(lanes[l]->p[1]);
    for (int i = 0; i < Frag::num_elements; ++i) {
      const int idx = l + 32 * i;
      dst[mem_offset(idx / Frag::cols, idx % Frag::cols, ldm, row_mem)] = f->x[i];
    }
  }
}

template <class Frag>
void gather(::fh_emu::LaneSlot* const* lanes, int which, float* out, bool tf32) {
  for (int l = 0; l < 32; ++l) {
    const Frag* f = static_cast<const Frag*>(lanes[l]->p[which]);
    for (int i = 0; i < Frag::num_elements; ++i) {
      float v = to_f(f->x[i]);
      out[l + 32 * i] = tf32 ? tf32_truncate(v) : v;
    }
  }
}

template <int M, int N, int K, class TA, class TC, class TD>
void complete_mma(::fh_emu::LaneSlot* const* lanes, unsigned) {
  typedef fragment<matrix_a, M, N, K, TA, row_major> FA; /* layout does not change storage */
  typedef fragment<matrix_b, M, N, K, TA, row_major> FB;
  typedef fragment<accumulator, M, N, K, TC> FC;
  typedef fragment<accumulator, M, N, K, TD> FD;
  const bool tf32 = std::is_same<TA, precision::tf32>::value;
  float a[M * K], b[K * N], c[M * N];
  /* Gather everything before writing: d may alias c (the usual acc = a*b + acc). */
  gather<FA>(lanes, 1, a, tf32);
  gather<FB>(lanes, 2, b, tf32);
  gather<FC>(lanes, 3, c, false);
  for (int l = 0; l < 32; ++l) {
    FD* d = static_cast<FD*>(const_cast<void*>(lanes[l]->p[0]));
    for (int i = 0; i < FD::num_elements; ++i) {
      const int idx = l + 32 * i, r = idx / N, col = idx % N;
      float acc = c[idx];
      for (int k = 0; k < K; ++k) acc += a[r * K + k] * b[k * N + col];
      d->x[i] = from_f<typename FD::element_type>(acc);
    }
  }
  ::fh_emu::note_mma(2ull * M * N * K);
}
} // namespace detail

/* matrix_a / matrix_b: the layout is part of the fragment type. */
template <class Use, int M, int N, int K, class T, class L, class S>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const S* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  static_assert(std::is_same<S, typename fragment<Use, M, N, K, T, L>::element_type>::value,
                "pointer type must match the fragment's element type");
  ::fh_emu::LaneSlot& s = ::fh_emu::lane_slot();
  s.p[0] = p;
  s.p[1] = &f;
  s.ldm = ldm;
  s.layout = std::is_same<L, row_major>::value ? mem_row_major : mem_col_major;
  ::fh_emu::warp_collective("wmma::load_matrix_sync", 0xffffffffu,
                            detail::complete_load<fragment<Use, M, N, K, T, L>, S>, 2);
}

template <int M, int N, int K, class T, class S>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const S* p, unsigned ldm, layout_t layout) {
  static_assert(std::is_same<S, T>::value, "pointer type must match the accumulator type");
  ::fh_emu::LaneSlot& s = ::fh_emu::lane_slot();
  s.p[0] = p;
  s.p[1] = &f;
  s.ldm = ldm;
  s.layout = layout;
  ::fh_emu::warp_collective("wmma::load_matrix_sync", 0xffffffffu,
                            detail::complete_load<fragment<accumulator, M, N, K, T>, S>, 2);
}

template <int M, int N, int K, class T, class S>
inline void store_matrix_sync(S* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  static_assert(std::is_same<S, T>::value, "pointer type must match the accumulator type");
  ::fh_emu::LaneSlot& s = ::fh_emu::lane_slot();
  s.p[0] = p;
  s.p[1] = &f;
  s.ldm = ldm;
  s.layout = layout;
  ::fh_emu::warp_collective("wmma::store_matrix_sync", 0xffffffffu,
                            detail::complete_store<fragment<accumulator, M, N, K, T>, S>, 2);
}

template <int M, int N, int K, class TA, class LA, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                     bool satf = false) {
  static_assert(std::is_same<TA, __half>::value || std::is_same<TA, __nv_bfloat16>::value ||
                    std::is_same<TA, precision::tf32>::value,
                "emulated MMA input types: __half, __nv_bfloat16, precision::tf32");
  static_assert(!std::is_same<TA, precision::tf32>::value || K == 8, "tf32 WMMA is m16n16k8");
  static_assert(std::is_same<TA, precision::tf32>::value || K == 16, "fp16/bf16 WMMA has k = 16");
  (void)satf;
  ::fh_emu::LaneSlot& s = ::fh_emu::lane_slot();
  s.p[0] = &d;
  s.p[1] = &a;
  s.p[2] = &b;
  s.p[3] = &c;
  ::fh_emu::warp_collective("wmma::mma_sync", 0xffffffffu, detail::complete_mma<M, N, K, TA, TC, TD>, 2);
}

} // namespace wmma
} // namespace nvcuda

#endif
