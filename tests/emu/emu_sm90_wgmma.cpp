/* emu_sm90_wgmma.cpp: the twin of wgmma.mma_async m64nNk16 (bf16 / f16 inputs, fp32
 * accumulators) with both operands in shared memory, and of wgmma.fence / commit_group /
 * wait_group (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions").
 *
 * Operands. The descriptors are decoded exactly ("Matrix Descriptor Format" and "Shared Memory
 * Matrix Layout"): start address, LBO and SBO in units of 16 bytes, swizzle none / 32 / 64 /
 * 128 B; K-major A [64 x 16] and B [N x 16] (no transpose), element (r, k) at
 *   no swizzle:  start + (r / 8) * SBO + (2k / 16) * LBO + (r % 8) * 16 + 2k % 16
 *   swizzle T:   swz_T(start + (r / 8) * SBO + (r % 8) * T + 2k)
 * where swz_T XORs the 16-byte chunk index with the row in the pattern's 8-row repeat
 * (emu_sm90_state.h, swizzle), the same function the bulk copy writes with. A descriptor whose
 * layout does not match the data gives wrong numbers, as on the hardware.
 *
 * Arithmetic: products are exact in fp32 (bf16 and f16 mantissas), summed in fp32 in k order,
 * onto the accumulator (scale-d 1) or zero (scale-d 0).
 *
 * Asynchrony. Each thread computes its own accumulator fragment (layout in ptx_sm90.cuh) at
 * issue, but the registers receive it only when a wait_group retires its group: until then they
 * hold the poison kAccPoison (NaN). Reports: an mma_async without a wgmma.fence since the
 * accumulators were last ordinary registers (first use, or after a wait_group retired a group);
 * accumulators written while in flight (found at the retiring wait_group); a poisoned value
 * stored with st.shared (an accumulator read before its wait_group); groups never retired when
 * the block ends. Chained mma_asyncs on the same accumulators need no fence (PTX ISA: same shape
 * accumulators are ordered), and each uses the previous one's result. */
#include <cstdio>
#include <cstring>

#include "emu_sm90_state.h"

namespace fh_emu {

using namespace sm90;

namespace {

float to_float(uint16_t h, WgmmaKind kind) {
  if (kind == WGMMA_BF16) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  /* IEEE binary16 -> binary32, exact (subnormals, inf, NaN included). */
  const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t b;
  if (e == 0x1f) b = sign | 0x7f800000u | (m << 13);
  else if (e) b = sign | ((e + 112) << 23) | (m << 13);
  else if (!m) b = sign;
  else {
    float f = (float)m * 0x1.0p-24f;
    std::memcpy(&b, &f, 4);
    b |= sign;
  }
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

struct Desc {
  uint32_t start, lbo, sbo, base, span;
};

Desc decode(uint64_t d, int t, const char* which) {
  Desc r;
  r.start = (uint32_t)(d & 0x3FFF) << 4;
  r.lbo = (uint32_t)((d >> 16) & 0x3FFF) << 4;
  r.sbo = (uint32_t)((d >> 32) & 0x3FFF) << 4;
  r.base = (uint32_t)((d >> 49) & 7);
  const uint32_t sw = (uint32_t)(d >> 62);
  r.span = sw == 0 ? 0 : sw == 1 ? 128 : sw == 2 ? 64 : 32;
  if (r.base)
    ptx::fail("wgmma descriptor not modelled", t, "descriptor %s 0x%016llx: matrix base offset %u (only 0, stages "
              "aligned to the swizzle pattern's repeat, is modelled)", which, (unsigned long long)d, r.base);
  return r;
}

/* Shared offset of K-major element (row r, k) of a 16-wide k slice. */
uint32_t elem_off(const Desc& d, uint32_t r, uint32_t k) {
  const uint32_t kb = 2 * k;
  if (!d.span) return d.start + (r / 8) * d.sbo + (kb / 16) * d.lbo + (r % 8) * 16 + kb % 16;
  return swizzle(d.start + (r / 8) * d.sbo + (r % 8) * d.span + kb, d.span);
}

float load_elem(PtxState& s, const Desc& d, uint32_t r, uint32_t k, WgmmaKind kind, int t, const char* which) {
  const uint32_t off = elem_off(d, r, k);
  if ((size_t)off + 2 > s.smem_bytes)
    ptx::fail("wgmma operand outside shared memory", t, "operand %s: element (%u, %u) at shared offset %u, past the %zu "
              "bytes of dynamic shared memory (start %u, LBO %u, SBO %u, swizzle %u B)", which, r, k, off,
              s.smem_bytes, d.start, d.lbo, d.sbo, d.span);
  if (s.bulk_inflight) check_bulk(s, t, s.smem + off, 2, false, which[0] == 'A' ? "wgmma operand A" : "wgmma operand B");
  ptx::check_cp_landed(s, t, s.smem + off, 2, ptx::K_WGMMA);
  uint16_t h;
  std::memcpy(&h, s.smem + off, 2);
  return to_float(h, kind);
}

/* .sync.aligned: the lanes of a warp must issue the same instruction with the same operands. */
void complete_uniform(LaneSlot* const* lanes, unsigned mask) {
  const LaneSlot* first = nullptr;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    if (!first) first = lanes[l];
    else if (lanes[l]->in != first->in || lanes[l]->p[0] != first->p[0] || lanes[l]->arg != first->arg ||
             lanes[l]->width != first->width)
      report_and_abort("wgmma operands differ between lanes of a warp",
                       "lane %d: descriptors 0x%016llx / %p, N %d, scale-d %d; lane of the first: 0x%016llx / %p, N %d, "
                       "scale-d %d (.sync.aligned needs the same instruction and operands in every lane)", l,
                       (unsigned long long)lanes[l]->in, lanes[l]->p[0], lanes[l]->arg, lanes[l]->width,
                       (unsigned long long)first->in, first->p[0], first->arg, first->width);
  }
}

int warpgroup_thread(const char* op) {
  const int t = running_thread().linear;
  /* The calling thread's warpgroup must be whole; the block may have more warps (a producer warp). */
  if ((t / 128 + 1) * 128 > block_threads())
    ptx::fail("wgmma outside a full warpgroup", t, "%s: the block has %d threads, so warpgroup %d (threads %d-%d) is "
              "not whole; a warpgroup is 4 whole warps (128 threads, starting at a warp index divisible by 4)", op,
              block_threads(), t / 128, t / 128 * 128, t / 128 * 128 + 127);
  return t;
}

/* This thread's operand elements of an m64nNk16: A at rows 16w + g (+8), B at columns 8j + 2q
 * (+1), 16 k each (b: column by column). Returns a hash of their bits. The hardware reads them at
 * some point between mma_async and the wait_group that retires it, so the twin reads them at both
 * ends and reports a difference. */
uint64_t read_operands(PtxState& s, uint64_t desc_a, uint64_t desc_b, int n, WgmmaKind kind, int t, float (&a)[2][16],
                       std::vector<float>& b, bool issue) {
  const Desc da = decode(desc_a, t, "A"), db = decode(desc_b, t, "B");
  const int lt = t % 128, w = lt / 32, g = (lt % 32) / 4, q = lt % 4;
  uint64_t hsh = 0xcbf29ce484222325ull;
  auto mix = [&](float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    hsh = (hsh ^ x) * 0x100000001b3ull;
  };
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) mix(a[h][k] = load_elem(s, da, (uint32_t)(16 * w + g + 8 * h), (uint32_t)k, kind, t, "A"));
  b.resize((size_t)n / 8 * 2 * 16);
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 2; ++c)
      for (int k = 0; k < 16; ++k)
        mix(b[(size_t)(2 * j + c) * 16 + k] = load_elem(s, db, (uint32_t)(8 * j + 2 * q + c), (uint32_t)k, kind, t, "B"));
  /* At issue, after every element passed the in-flight checks (a copy not yet landed is the
   * first mistake to name): the proxy order of the landed ones (emu_ptx_state.h, "Proxies"). */
  for (int h = 0; issue && h < 2; ++h)
    for (int k = 0; k < 16; ++k)
      ptx::check_async_read(s, t, s.smem + elem_off(da, (uint32_t)(16 * w + g + 8 * h), (uint32_t)k), 2, "wgmma operand A");
  for (int j = 0; issue && j < n / 8; ++j)
    for (int c = 0; c < 2; ++c)
      for (int k = 0; k < 16; ++k)
        ptx::check_async_read(s, t, s.smem + elem_off(db, (uint32_t)(8 * j + 2 * q + c), (uint32_t)k), 2,
                              "wgmma operand B");
  return hsh;
}

void sync_warp(const char* name, uint64_t in, const void* p0, int arg, int width) {
  LaneSlot& sl = lane_slot();
  sl.in = in;
  sl.p[0] = p0;
  sl.arg = arg;
  sl.width = width;
  warp_collective(name, 0xffffffffu, complete_uniform, 3);
}

} // namespace

void sm90_wgmma_fence() {
  ptx::state();
  const int t = warpgroup_thread("wgmma.fence");
  sync_warp("wgmma.fence", 0, nullptr, 0, 0);
  st().threads[(size_t)t].fenced = true;
}

void sm90_wgmma_commit() {
  ptx::state();
  const int t = warpgroup_thread("wgmma.commit_group");
  sync_warp("wgmma.commit_group", 0, nullptr, 0, 0);
  WgThread& me = st().threads[(size_t)t];
  for (WgOp& o : me.ops)
    if (o.group < 0) o.group = me.committed;
  ++me.committed; /* an empty group is a group too */
}

void sm90_wgmma_wait(int n) {
  ptx::state();
  const int t = warpgroup_thread("wgmma.wait_group");
  if (n < 0 || n > 7) ptx::fail("invalid wgmma.wait_group operand", t, "N = %d is outside [0, 7]", n);
  sync_warp("wgmma.wait_group", (uint64_t)n, nullptr, 0, 0);
  WgThread& me = st().threads[(size_t)t];
  const int retire_below = me.committed - n;
  std::vector<WgOp> kept;
  bool retired = false;
  for (size_t i = 0; i < me.ops.size(); ++i) {
    WgOp& o = me.ops[i];
    if (o.group < 0 || o.group >= retire_below) {
      kept.push_back(std::move(o));
      continue;
    }
    retired = true;
    {
      float a[2][16];
      std::vector<float> b;
      if (read_operands(ptx::state(), o.desc_a, o.desc_b, o.n, (WgmmaKind)o.kind, t, a, b, false) != o.operand_hash)
        ptx::fail("wgmma operand changed while in flight", t,
                  "wgmma.wait_group %d retires the m64n%dk16 of commit group %d, but the shared memory of its A or B "
                  "operand (descriptors 0x%016llx, 0x%016llx) was written after the mma_async: the operands belong "
                  "to the wgmma until the wait_group that retires it (a stage released or refilled too early?)",
                  n, o.n, o.group, (unsigned long long)o.desc_a, (unsigned long long)o.desc_b);
    }
    bool later = false; /* a later op on the same registers delivers instead */
    for (size_t j = i + 1; j < me.ops.size(); ++j) later |= me.ops[j].d == o.d;
    if (later) continue;
    const int nr = o.n / 2;
    for (int r = 0; r < nr; ++r) {
      uint32_t b;
      std::memcpy(&b, &o.d[r], 4);
      if (b != kAccPoison)
        ptx::fail("accumulator written while its wgmma was in flight", t,
                  "wgmma.wait_group %d retires the m64n%dk16 of commit group %d, but its accumulator register %d was "
                  "overwritten (0x%08x) in between: the accumulators belong to the wgmma from mma_async until the "
                  "wait_group that retires its group", n, o.n, o.group, r, b);
    }
    std::memcpy(o.d, o.result.data(), sizeof(float) * (size_t)nr);
  }
  me.ops.swap(kept);
  if (retired) {
    me.fenced = false; /* the registers are ordinary again: the next mma_async needs a fence */
    me.retired = retire_below;
  }
}

void sm90_wgmma(float* d, int n, uint64_t desc_a, uint64_t desc_b, int scale_d, WgmmaKind kind) {
  PtxState& s = ptx::state();
  const int t = warpgroup_thread("wgmma.mma_async");
  if (n % 8 || n < 8 || n > 256) ptx::fail("invalid wgmma shape", t, "m64n%dk16: N must be a multiple of 8 in [8, 256]", n);
  sync_warp("wgmma.mma_async", desc_a ^ (desc_b * 0x9e3779b97f4a7c15ull), (const void*)(uintptr_t)desc_b, n,
            scale_d != 0);
  Sm90State& S = st();
  WgThread& me = S.threads[(size_t)t];
  const int nr = n / 2;
  /* The latest op not yet retired on these registers: chaining onto it needs no fence. */
  const WgOp* prev = nullptr;
  for (const WgOp& o : me.ops)
    if (o.d == d) prev = &o;
  if (prev && prev->n != n)
    ptx::fail("wgmma accumulators reused with another shape while in flight", t,
              "mma_async m64n%dk16 on the registers of an m64n%dk16 still in flight (only same-shape chains are ordered)",
              n, prev->n);
  if (!prev && !me.fenced)
    ptx::fail("wgmma.mma_async without wgmma.fence", t,
              "no wgmma.fence since %s: registers accessed by ordinary code must be fenced before an mma_async reads "
              "or writes them", me.committed == 0 && me.retired == 0 ? "the start of the kernel"
                                                                        : "the last wgmma.wait_group retired a group");
  WgOp op;
  op.d = d;
  op.n = n;
  op.group = -1;
  op.result.resize((size_t)nr);
  if (prev) std::memcpy(op.result.data(), prev->result.data(), sizeof(float) * (size_t)nr);
  else std::memcpy(op.result.data(), d, sizeof(float) * (size_t)nr);
  if (!scale_d) std::fill(op.result.begin(), op.result.end(), 0.0f);
  float a[2][16];
  std::vector<float> b;
  op.desc_a = desc_a, op.desc_b = desc_b, op.kind = kind;
  op.operand_hash = read_operands(s, desc_a, desc_b, n, kind, t, a, b, true);
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 2; ++c) {
      const float* bc = &b[(size_t)(2 * j + c) * 16];
      for (int h = 0; h < 2; ++h) {
        float acc = op.result[(size_t)(4 * j + 2 * h + c)];
        for (int k = 0; k < 16; ++k) acc += a[h][k] * bc[k];
        op.result[(size_t)(4 * j + 2 * h + c)] = acc;
      }
    }
  me.ops.push_back(std::move(op));
  for (int r = 0; r < nr; ++r) std::memcpy(&d[r], &kAccPoison, 4);
  s.wgmma_used = true;
  S.any_wgmma = true;
  if (t % 128 == 0) note_mma(2ull * 64 * (uint64_t)n * 16);
}

void sm90_check_taint(const void* src, int bytes, const char* op) {
  const unsigned char* p = static_cast<const unsigned char*>(src);
  for (int i = 0; i + 4 <= bytes; i += 4) {
    uint32_t b;
    std::memcpy(&b, p + i, 4);
    if (sm90_is_poison(b))
      ptx::fail("accumulator read before wgmma.wait_group", running_thread().linear,
                "%s stores 0x%08x, the poison of a wgmma accumulator still in flight: a wgmma.wait_group must retire "
                "the group before its accumulators are read", op, b);
  }
}

} // namespace fh_emu
