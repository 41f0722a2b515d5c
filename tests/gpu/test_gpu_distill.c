/* gpu_distill: the CUDA distillation forward and backward on a real device, through the public
 * API with device buffers, against the fp64 CPU reference with the tolerance rule of
 * tests/kernel/test_linear_ce_common.h. A compact selection of the kernel_distill cases (every
 * dtype, several divergences, every accumulation mode, the tile-crossing shape with D_s != D_t
 * and V_t > V; the sparse teacher in each mode). Every test skips when no CUDA device is present; the same file runs on the
 * emulator as part of test_gpu_emu, exercising the device-memory path of the helpers. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench_cuda.h"
#include "test_distill_common.h"
#include "test_linear_ce_common.h"

static void* gpu_alloc(size_t bytes) { return bc_malloc(bytes); }
static int gpu_to_device(void* dst, const void* src, size_t bytes) { return bc_copy_to_device(dst, src, bytes); }
static int gpu_to_host(void* dst, const void* src, size_t bytes) { return bc_copy_to_host(dst, src, bytes); }

/* Skips without a device; installs the device-memory hooks the helpers mirror through. */
static void gpu_setup(void) {
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) cr_skip_test("no CUDA device: %s", fh_last_error());
  fh_context_destroy(ctx);
  const lk_memory_t m = {gpu_alloc, bc_free, gpu_to_device, gpu_to_host};
  lk_set_memory(&m);
}

static const fh_dtype_t DTYPES[3] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
static const char* const DNAME[3] = {"f32", "f16", "bf16"};

Test(gpu_distill, forward_every_dtype, .timeout = 600) {
  gpu_setup();
  static const fh_distill_divergence_t DIV[4] = {FH_DISTILL_FORWARD_KL, FH_DISTILL_JSD, FH_DISTILL_TVD,
                                                 FH_DISTILL_ALPHA};
  int ok = 1;
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(130, 300, 72, 317, 40, DTYPES[di]);
    dk_problem_t P;
    dk_init(&P, &s);
    for (int d = 0; d < 4; ++d) {
      fh_distill_options_t o = dk_opts(DIV[d], d == 3 ? -0.5f : 0.3f);
      if (d == 1) o.reduction = FH_REDUCTION_MEAN;
      char label[64];
      snprintf(label, sizeof label, "gpu %s div %d", DNAME[di], (int)DIV[d]);
      ok &= dk_check_forward(label, &P, &o, NULL);
    }
    dk_free(&P);
  }
  lk_set_memory(NULL);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

Test(gpu_distill, backward_modes_dtypes, .timeout = 600) {
  gpu_setup();
  int ok = 1;
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(130, 300, 72, 317, 40, DTYPES[di]);
    dk_problem_t P;
    dk_init(&P, &s);
    for (int m = 0; m < 3; ++m) {
      fh_distill_options_t o = dk_opts(m == 1 ? FH_DISTILL_REVERSE_KL : FH_DISTILL_JSD, 0.3f);
      o.accum_mode = (fh_accum_mode_t)m;
      o.reduction = FH_REDUCTION_MEAN;
      char label[64];
      snprintf(label, sizeof label, "gpu %s", DNAME[di]);
      ok &= dk_check_backward(label, &P, &o, NULL);
    }
    dk_free(&P);
  }
  lk_set_memory(NULL);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

/* The sparse teacher (kernels/distill_sparse.cu): each mass mode in each dtype, K = 17, forward
 * and backward, the accumulation mode cycling. */
Test(gpu_distill, sparse_modes_dtypes, .timeout = 600) {
  gpu_setup();
  int ok = 1;
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(130, 300, 72, 300, 8, DTYPES[di]);
    dk_problem_t P;
    dk_init(&P, &s);
    dk_sparse_init(&P, 17, 61, 0);
    for (int m = 0; m < 3; ++m) {
      fh_distill_options_t o = dk_opts(m == 1 ? FH_DISTILL_REVERSE_KL : m == 0 ? FH_DISTILL_JSD : FH_DISTILL_FORWARD_KL,
                                       0.3f);
      o.sparse_mass = (fh_distill_sparse_mass_t)m;
      if (m != 0) o.temperature = 1.0f; /* remainder and none need T = 1 */
      o.accum_mode = (fh_accum_mode_t)((m + di) % 3);
      char label[64];
      snprintf(label, sizeof label, "gpu sparse %s mass %d", DNAME[di], m);
      ok &= dk_check_backward(label, &P, &o, NULL);
    }
    dk_free(&P);
  }
  lk_set_memory(NULL);
  cr_assert(ok, "a comparison failed (see the lines above)");
}
