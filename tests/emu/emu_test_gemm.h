/* emu_test_gemm.h: inputs and checks for the emulator suites that multiply on the Hopper twins
 * (test_sm90.cu, test_cp_arrive.cu): matrices of multiples of 1/8 in [-1, 1], exact in bf16 and
 * fp16, so that every product and every sum of up to a few thousand of them is exact in fp32
 * and a result compares equal to its reference. */
#ifndef FH_EMU_TEST_GEMM_H
#define FH_EMU_TEST_GEMM_H

#include <cstdint>
#include <cstring>
#include <vector>

#include "emu_test.h"

inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (uint16_t)(b >> 16); /* the values are exact in bf16 */
}

/* rows x cols multiples of 1/8 in [-1, 1], from a seed. */
inline std::vector<float> random_matrix(int rows, int cols, unsigned seed) {
  std::vector<float> v((size_t)rows * cols);
  for (float& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = (float)((int)(seed >> 24) % 17 - 8) / 8.0f;
  }
  return v;
}

inline uint16_t* upload_bf16(const std::vector<float>& v, bool f16 = false) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = f16 ? __half_as_ushort(__float2half(v[i])) : to_bf16(v[i]);
  return dev_upload(h);
}

/* Entries of the m x n result h (row-major) that differ from A·Bᵀ (A [m x k], B [n x k]),
 * summed in k order in fp32. */
inline int gemm_mismatches(const std::vector<float>& h, const std::vector<float>& A, const std::vector<float>& B, int m,
                           int n, int k) {
  int bad = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float ref = 0.0f;
      for (int kk = 0; kk < k; ++kk) ref += A[(size_t)i * k + kk] * B[(size_t)j * k + kk];
      bad += !(h[(size_t)i * n + j] == ref);
    }
  return bad;
}

#endif
