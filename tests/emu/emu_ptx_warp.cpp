/* emu_ptx_warp.cpp: the warp-wide PTX twins (ldmatrix, mma.sync) and the shared-memory bank and
 * global-sector accounting of every twin access.
 *
 * Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type",
 * "Matrix Fragments for mma.m16n8k8" (.tf32) and "Warp-level matrix load instruction: ldmatrix";
 * they are restated in kernels/engine/ptx.cuh's top comment and docs/engine.md.
 *
 * Banks. Shared memory has 32 banks of 4 bytes; bank = (address / 4) % 32. A warp-wide access is
 * served in phases: all 32 lanes for 4-byte accesses, half warps for 8 bytes, quarter warps
 * (8 lanes) for 16 bytes, and each 8x8 matrix (8 rows of 16 bytes) for ldmatrix. Within a phase,
 * lanes reading the same word are served together (broadcast); distinct words in one bank are
 * served one after another. A phase's "ways" = the largest number of distinct words any bank
 * holds; it costs that many wavefronts, so ways - 1 are replays. */
#include <algorithm>
#include <cstring>

#include "emu_ptx.h"
#include "emu_ptx_state.h"

namespace fh_emu {
namespace ptx {

int bank_ways(const uint32_t* word_addr, int n) {
  if (n <= 0) return 0;
  uint32_t w[128];
  n = std::min(n, 128);
  std::memcpy(w, word_addr, (size_t)n * sizeof(uint32_t));
  std::sort(w, w + n);
  const int distinct = (int)(std::unique(w, w + n) - w);
  int per_bank[32] = {};
  int ways = 0;
  for (int i = 0; i < distinct; ++i) ways = std::max(ways, ++per_bank[w[i] % 32]);
  return ways;
}

void note_phase(int ways) {
  if (ways <= 0) return;
  fh_emu_counters_t& c = worker_counters();
  c.smem_wavefronts += (uint64_t)ways;
  c.bank_conflict_replays += (uint64_t)(ways - 1);
  c.bank_conflict_max_ways = std::max<uint64_t>(c.bank_conflict_max_ways, (uint64_t)ways);
}

namespace {

/* One warp-wide instruction of a stream: its shared phases, and for cp.async its global sectors. */
void count_instruction(const Instr& in, Stream st) {
  if (!in.mask) return;
  int widest = 0;
  for (int l = 0; l < 32; ++l)
    if (in.mask >> l & 1) widest = std::max(widest, (int)in.sbytes[l]);
  const int lanes_per_phase = widest >= 16 ? 8 : widest >= 8 ? 16 : 32;
  for (int p0 = 0; p0 < 32; p0 += lanes_per_phase) {
    uint32_t words[128];
    int n = 0;
    for (int l = p0; l < p0 + lanes_per_phase; ++l)
      if (in.mask >> l & 1)
        for (int q = 0; q < in.sbytes[l] / 4; ++q) words[n++] = in.saddr[l] / 4 + (uint32_t)q;
    note_phase(bank_ways(words, n));
  }
  fh_emu_counters_t& c = worker_counters();
  ++c.smem_requests;
  if (st != S_CP) return;
  uint64_t sectors[64];
  int n = 0;
  for (int l = 0; l < 32; ++l)
    if ((in.mask >> l & 1) && in.gbytes[l] > 0)
      for (uint64_t sec = in.gaddr[l] / 32; sec <= (in.gaddr[l] + in.gbytes[l] - 1) / 32; ++sec) sectors[n++] = sec;
  if (!n) return; /* every lane zero-filled: no global request at all */
  std::sort(sectors, sectors + n);
  ++c.global_requests;
  c.global_sectors += (uint64_t)(std::unique(sectors, sectors + n) - sectors);
}

} // namespace

void group_access(PtxState& s, Stream st, const void* saddr, int sbytes, const void* gaddr, int gbytes) {
  const RunningThread t = running_thread();
  WarpPtx& w = s.warps[(size_t)t.warp];
  const uint32_t idx = s.threads[(size_t)t.linear].k[st]++ - w.base[st];
  std::deque<Instr>& q = w.q[st];
  while (q.size() <= idx) {
    q.emplace_back();
    std::memset(&q.back(), 0, sizeof(Instr));
  }
  Instr& in = q[idx];
  in.mask |= 1u << t.lane;
  in.saddr[t.lane] = (uint32_t)(uintptr_t)saddr;
  in.sbytes[t.lane] = (uint8_t)sbytes;
  in.gaddr[t.lane] = (uint64_t)(uintptr_t)gaddr;
  in.gbytes[t.lane] = (uint8_t)gbytes;
  /* Count instructions every live lane has issued; a lane that exits early (or issues fewer)
   * leaves its warp's later instructions to the next barrier's flush. */
  const unsigned live = warp_live_mask(t.warp);
  while (!q.empty() && (live & ~q.front().mask) == 0) {
    count_instruction(q.front(), st);
    q.pop_front();
    ++w.base[st];
  }
}

void flush_warp(PtxState& s, int warp) {
  WarpPtx& w = s.warps[(size_t)warp];
  for (int st = 0; st < S_COUNT; ++st) {
    for (const Instr& in : w.q[st]) count_instruction(in, (Stream)st);
    w.q[st].clear();
    w.base[st] = 0;
  }
  for (int t = warp * 32; t < warp * 32 + 32 && t < s.nthreads; ++t)
    std::memset(s.threads[(size_t)t].k, 0, sizeof s.threads[(size_t)t].k);
}

void flush_instructions(PtxState& s) {
  for (size_t w = 0; w < s.warps.size(); ++w) flush_warp(s, (int)w);
}

namespace {

void complete_ldmatrix(LaneSlot* const* lanes, unsigned) {
  PtxState& s = state();
  const int warp = running_thread().warp;
  const int num = lanes[0]->arg;
  const int trans = lanes[0]->width;
  for (int l = 1; l < 32; ++l)
    if (lanes[l]->arg != num || lanes[l]->width != trans)
      fail("lanes of one ldmatrix use different shapes (.aligned requires the same instruction)", warp * 32 + l,
           "ldmatrix .x%d%s, lane 0 ldmatrix .x%d%s", lanes[l]->arg, lanes[l]->width ? ".trans" : "", num,
           trans ? ".trans" : "");
  /* Only the first 8*num lanes' addresses are used (PTX ISA): the others are ignored, as on the
   * hardware, so they are not checked either. */
  const unsigned char* row[32];
  for (int i = 0; i < 8 * num; ++i) {
    row[i] = static_cast<const unsigned char*>(lanes[i]->p[0]);
    check_aligned(row[i], 16, "ldmatrix", "row address", warp * 32 + i);
    locate(s, row[i], 16, "ldmatrix row", warp * 32 + i);
    /* The read is the address lane's, made before the collective orders anything. */
    shadow_read(s, warp * 32 + i, row[i], 16, K_LDMATRIX);
  }
  for (int m = 0; m < num; ++m) {
    uint32_t words[32];
    for (int j = 0; j < 8; ++j)
      for (int q = 0; q < 4; ++q) words[j * 4 + q] = (uint32_t)((uintptr_t)row[8 * m + j] / 4) + (uint32_t)q;
    note_phase(bank_ways(words, 32));
  }
  fh_emu_counters_t& c = worker_counters();
  ++c.ldmatrix_ops;
  ++c.smem_requests;
  uint32_t out[32][4];
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < num; ++i) {
      if (!trans) { /* row l/4 of matrix i, elements 2(l%4), 2(l%4)+1 */
        std::memcpy(&out[l][i], row[8 * i + l / 4] + 4 * (l % 4), 4);
      } else { /* column l/4, rows 2(l%4) (low half) and 2(l%4)+1 (high half) */
        uint16_t lo, hi;
        std::memcpy(&lo, row[8 * i + 2 * (l % 4)] + 2 * (l / 4), 2);
        std::memcpy(&hi, row[8 * i + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
        out[l][i] = (uint32_t)lo | (uint32_t)hi << 16;
      }
    }
  for (int l = 0; l < 32; ++l)
    std::memcpy(const_cast<void*>(lanes[l]->p[1]), out[l], (size_t)num * sizeof(uint32_t));
}

float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }
float f16_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31u, m = h & 0x3ffu;
  if (e == 31) return bits_to_float(sign | 0x7f800000u | m << 13);
  if (e == 0) { /* zero or subnormal: m * 2^-24, exact in fp32 */
    const float v = (float)m * 0x1p-24f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | (e + 112u) << 23 | m << 13);
}
/* What the tensor core reads of a .tf32 operand register: the top 19 bits (PTX ISA: the
 * operand is a .b32 holding a tf32 value; the low 13 mantissa bits are ignored). Inf/NaN keep
 * their pattern, so a NaN does not turn into an infinity. */
float tf32_operand(uint32_t b) {
  if ((b & 0x7f800000u) != 0x7f800000u) b &= 0xffffe000u;
  return bits_to_float(b);
}
void two_halves(uint32_t r, int kind, float& lo, float& hi) {
  if (kind == MMA_BF16_16816) {
    lo = bf16_to_float((uint16_t)r);
    hi = bf16_to_float((uint16_t)(r >> 16));
  } else {
    lo = f16_to_float((uint16_t)r);
    hi = f16_to_float((uint16_t)(r >> 16));
  }
}

void complete_mma(LaneSlot* const* lanes, unsigned) {
  const int warp = running_thread().warp;
  const int kind = lanes[0]->arg;
  for (int l = 1; l < 32; ++l)
    if (lanes[l]->arg != kind)
      fail("lanes of one mma.sync use different types (.aligned requires the same instruction)", warp * 32 + l,
           "mma kind %d, lane 0 kind %d", lanes[l]->arg, kind);
  const int K = kind == MMA_TF32_1688 ? 8 : 16;
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* a = static_cast<const uint32_t*>(lanes[l]->p[1]);
    const uint32_t* b = static_cast<const uint32_t*>(lanes[l]->p[2]);
    const float* d = static_cast<const float*>(lanes[l]->p[0]);
    if (kind == MMA_TF32_1688) {
      A[g][t] = tf32_operand(a[0]);
      A[g + 8][t] = tf32_operand(a[1]);
      A[g][t + 4] = tf32_operand(a[2]);
      A[g + 8][t + 4] = tf32_operand(a[3]);
      B[t][g] = tf32_operand(b[0]);
      B[t + 4][g] = tf32_operand(b[1]);
    } else {
      two_halves(a[0], kind, A[g][2 * t], A[g][2 * t + 1]);
      two_halves(a[1], kind, A[g + 8][2 * t], A[g + 8][2 * t + 1]);
      two_halves(a[2], kind, A[g][2 * t + 8], A[g][2 * t + 9]);
      two_halves(a[3], kind, A[g + 8][2 * t + 8], A[g + 8][2 * t + 9]);
      two_halves(b[0], kind, B[2 * t][g], B[2 * t + 1][g]);
      two_halves(b[1], kind, B[2 * t + 8][g], B[2 * t + 9][g]);
    }
    C[g][2 * t] = d[0];
    C[g][2 * t + 1] = d[1];
    C[g + 8][2 * t] = d[2];
    C[g + 8][2 * t + 1] = d[3];
  }
  /* fp32 accumulation in k order of exactly formed products (an fp16/bf16/tf32 product fits in
   * fp32's 24-bit significand); the tensor core's internal order and rounding are not modelled. */
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < K; ++k) acc += A[i][k] * B[k][j];
      D[i][j] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = static_cast<float*>(const_cast<void*>(lanes[l]->p[0]));
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
  note_mma(2ull * 16 * 8 * (unsigned)K);
}

} // namespace
} // namespace ptx

void ptx_ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr) {
  ptx::state();
  maybe_yield();
  if (num != 1 && num != 2 && num != 4)
    ptx::fail("invalid ldmatrix shape", running_thread().linear, "ldmatrix .x%d (1, 2 or 4)", num);
  LaneSlot& s = lane_slot();
  s.p[0] = row_addr;
  s.p[1] = r;
  s.arg = num;
  s.width = trans ? 1 : 0;
  warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", 0xffffffffu, ptx::complete_ldmatrix, 3);
}

void ptx_mma(float* d, const uint32_t* a, const uint32_t* b, MmaKind kind) {
  LaneSlot& s = lane_slot();
  s.p[0] = d;
  s.p[1] = a;
  s.p[2] = b;
  s.arg = (int)kind;
  warp_collective("mma.sync", 0xffffffffu, ptx::complete_mma, 3);
}

} // namespace fh_emu
