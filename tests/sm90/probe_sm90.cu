/* probe_sm90.cu: every wrapper of kernels/engine/ptx_sm90.cuh in one kernel, compiled by
 * scripts/sm90_sass_check.sh for sm_90a so that the SASS shows what each becomes (HGMMA for
 * wgmma, UTMALDG for the bulk tensor copy, SYNCS for mbarrier). Not part of the library and never
 * launched: it is evidence that the inline PTX assembles and selects the Hopper instructions. */
#include <cuda.h>
#include <stdint.h>

#include "engine/ptx_sm90.cuh"

template <int N, bool Bf16 = true>
__device__ __forceinline__ void mma_chain(float (&d)[N / 2], uint32_t a, uint32_t b) {
  fh_ptx::wgmma_fence();
  for (int ks = 0; ks < 4; ++ks) {
    const uint64_t da = fh_ptx::make_smem_desc(a + 32 * ks, 16, 1024, fh_ptx::SWIZZLE_128B);
    const uint64_t db = fh_ptx::make_smem_desc(b + 32 * ks, 16, 1024, fh_ptx::SWIZZLE_128B);
    fh_ptx::wgmma<N, Bf16>(d, da, db, ks > 0);
  }
  fh_ptx::wgmma_commit();
  fh_ptx::wgmma_wait<0>();
}

/* One producer warpgroup (thread 0 issues the copies) and one consumer warpgroup. */
extern "C" __global__ void __launch_bounds__(256, 1)
    probe_sm90(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb, float* out, int which) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  unsigned char* sA = smem + 1024;
  unsigned char* sB = sA + 8192;
  if (threadIdx.x == 0) {
    fh_ptx::mbar_init(full, 1);
    fh_ptx::fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    fh_ptx::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      fh_ptx::mbar_arrive_expect_tx(full, 8192 + 32768);
      fh_ptx::tma_load_2d(sA, &ta, 0, blockIdx.x * 64, full);
      if (fh_ptx::cluster_nctarank() > 1)
        fh_ptx::tma_load_2d_multicast(sB, &tb, 0, 0, full, (uint16_t)1);
      else
        fh_ptx::tma_load_2d(sB, &tb, 0, 0, full);
    }
  } else {
    fh_ptx::setmaxnreg_inc<232>();
    fh_ptx::mbar_wait(full, 0);
    const uint32_t a = fh_ptx::smem_u32(sA), b = fh_ptx::smem_u32(sB);
    const int t = threadIdx.x - 128;
    if (which == 0) {
      float d[32];
      mma_chain<64>(d, a, b);
      for (int i = 0; i < 32; ++i) out[t * 32 + i] = d[i];
    } else if (which == 1) {
      float d[64];
      mma_chain<128>(d, a, b);
      for (int i = 0; i < 64; ++i) out[t * 64 + i] = d[i];
    } else if (which == 3) {
      float d[32];
      mma_chain<64, false>(d, a, b); /* the f16 wrappers */
      for (int i = 0; i < 32; ++i) out[t * 32 + i] = d[i];
    } else {
      float d[128];
      mma_chain<256>(d, a, b);
      for (int i = 0; i < 128; ++i) out[t * 128 + i] = d[i];
    }
    fh_ptx::fence_proxy_async();
    void* peer = fh_ptx::mapa(smem, fh_ptx::cluster_ctarank());
    if (t == 0) out[0] += (float)(uintptr_t)peer;
    out[t] += (float)fh_ptx::bar_red_or(1, 128, t == 0); /* the consumers' __syncthreads_or */
    (void)fh_ptx::mbar_arrive(full);
  }
}
