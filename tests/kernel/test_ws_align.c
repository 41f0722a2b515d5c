/* kernel_ws_align: the workspace base alignment rule (FH_WORKSPACE_ALIGNMENT, checked at the API
 * boundary by fh_check_workspace, src/validate.c) on the CUDA paths that use a workspace. The
 * workspace carve-ups are 256-byte offsets from the caller's base and the first thing in it is an
 * fp64 header, so a base that is not 8-byte aligned made the prep kernel store a misaligned
 * double: a fault on the GPU, a UBSan abort under the emulator. Every call rejects a base that
 * is not 16-byte aligned with FH_ERR_INVALID_ARGUMENT before any launch, and accepts any
 * 16-byte aligned base (not only 256). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/baseline_lce.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

static fh_context_t* cuda_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  return ctx;
}

/* Offsets from a malloc base (16-byte aligned on the platforms we run on): 4 and 8 are below the
 * requirement (4 would also misalign the fp64 header), 16 and 48 satisfy it. */
static const size_t BAD[2] = {4, 8};
static const size_t GOOD[2] = {16, 48};

/* aligned_alloc wants a size that is a multiple of the alignment; 256 extra for the offsets. */
static unsigned char* alloc_ws(size_t wsb) { return aligned_alloc(256, (wsb + 511) / 256 * 256); }

static fh_status_t run_fwd(fh_context_t* ctx, lk_problem_t* P, unsigned char* base, size_t off, size_t wsb,
                           float* loss) {
  fh_linear_ce_outputs_t o = {loss, NULL, NULL, NULL, NULL, NULL};
  return fh_linear_ce_forward(ctx, &P->f.opt, &P->tE, &P->tC, &P->tb, P->f.targets, NULL, NULL, &o, base + off, wsb);
}

Test(kernel_ws_align, forward) {
  lk_spec_t s = lk_default(37, 101, 19, FH_DTYPE_F32);
  lk_problem_t P;
  lk_init(&P, &s);
  fh_context_t* ctx = cuda_ctx();
  size_t wsb = 0;
  cr_assert_eq(fh_linear_ce_forward_workspace_size(ctx, &P.f.opt, 37, 101, 19, FH_DTYPE_F32, &wsb), FH_SUCCESS);
  unsigned char* base = alloc_ws(wsb);
  cr_assert(base);
  float loss[2] = {-1.0f, -1.0f};
  for (int k = 0; k < 2; ++k) {
    loss[0] = -1.0f;
    cr_expect_eq(run_fwd(ctx, &P, base, BAD[k], wsb, loss), FH_ERR_INVALID_ARGUMENT, "offset %zu accepted", BAD[k]);
    cr_expect(strstr(fh_last_error(), "fh_linear_ce_forward") && strstr(fh_last_error(), "aligned"), "message: %s",
              fh_last_error());
    cr_expect_eq(loss[0], -1.0f, "nothing may be written on a rejected call");
  }
  float ref = 0.0f;
  for (int k = 0; k < 2; ++k) {
    cr_assert_eq(run_fwd(ctx, &P, base, GOOD[k], wsb, loss), FH_SUCCESS, "offset %zu: %s", GOOD[k], fh_last_error());
    if (k == 0) ref = loss[0];
    cr_expect(loss[0] == ref && loss[0] == loss[0], "loss %.9g at offset %zu vs %.9g", loss[0], GOOD[k], ref);
  }
  free(base);
  lk_free(&P);
  fh_context_destroy(ctx);
}

Test(kernel_ws_align, backward) {
  const int64_t N = 37, V = 101, D = 19;
  lk_spec_t s = lk_default(N, V, D, FH_DTYPE_F16);
  lk_problem_t P;
  lk_init(&P, &s);
  fh_context_t* ctx = cuda_ctx();
  size_t wsb = 0;
  cr_assert_eq(fh_linear_ce_backward_workspace_size(ctx, &P.f.opt, N, V, D, FH_DTYPE_F16, &wsb), FH_SUCCESS);
  unsigned char* base = alloc_ws(wsb);
  float* lse = calloc((size_t)N, sizeof(float));
  float gl = 1.0f;
  uint16_t* dE = calloc((size_t)(N * D), sizeof(uint16_t));
  cr_assert(base && lse && dE);
  fh_tensor_t tdE = fh_tensor_2d(dE, FH_DTYPE_F16, N, D);
  fh_linear_ce_grads_t g = {&tdE, NULL, NULL};
  fh_linear_ce_grad_inputs_t in = {lse, NULL, &gl, NULL};
  for (int k = 0; k < 2; ++k) {
    for (int64_t q = 0; q < N * D; ++q) dE[q] = 0x7e00u; /* fp16 NaN: must stay untouched */
    const fh_status_t st = fh_linear_ce_backward(ctx, &P.f.opt, &P.tE, &P.tC, &P.tb, P.f.targets, NULL, NULL, &in,
                                                 &g, base + BAD[k], wsb);
    cr_expect_eq(st, FH_ERR_INVALID_ARGUMENT, "offset %zu accepted", BAD[k]);
    cr_expect(strstr(fh_last_error(), "fh_linear_ce_backward") && strstr(fh_last_error(), "aligned"), "message: %s",
              fh_last_error());
    int untouched = 1;
    for (int64_t q = 0; q < N * D; ++q) untouched &= dE[q] == 0x7e00u;
    cr_expect(untouched, "dE written on a rejected call");
  }
  cr_expect_eq(fh_linear_ce_backward(ctx, &P.f.opt, &P.tE, &P.tC, &P.tb, P.f.targets, NULL, NULL, &in, &g,
                                     base + GOOD[0], wsb),
               FH_SUCCESS, "%s", fh_last_error());
  free(dE), free(lse), free(base);
  lk_free(&P);
  fh_context_destroy(ctx);
}

Test(kernel_ws_align, baseline) {
  lk_spec_t s = lk_default(37, 101, 19, FH_DTYPE_F32);
  lk_problem_t P;
  lk_init(&P, &s);
  fh_context_t* ctx = cuda_ctx();
  fh_baseline_lce_args_t a;
  memset(&a, 0, sizeof a);
  a.N = 37, a.V = 101, a.D = 19, a.dtype = FH_DTYPE_F32;
  a.E = P.tE.data, a.lde = P.tE.row_stride, a.C = P.tC.data, a.ldc = P.tC.row_stride;
  a.targets = P.f.targets, a.ignore_index = P.f.opt.ignore_index, a.reduction = FH_REDUCTION_MEAN;
  size_t wsb = 0;
  cr_assert_eq(fh_baseline_lce_workspace_size(a.N, a.V, a.dtype, &wsb), FH_SUCCESS);
  unsigned char* base = alloc_ws(wsb);
  cr_assert(base);
  float loss = -1.0f;
  for (int k = 0; k < 2; ++k) {
    cr_expect_eq(fh_baseline_lce_forward(ctx, &a, &loss, base + BAD[k], wsb), FH_ERR_INVALID_ARGUMENT,
                 "offset %zu accepted", BAD[k]);
    cr_expect(strstr(fh_last_error(), "aligned"), "message: %s", fh_last_error());
  }
  cr_expect_eq(loss, -1.0f, "nothing may be written on a rejected call");
  cr_expect_eq(fh_baseline_lce_forward(ctx, &a, &loss, base + GOOD[1], wsb), FH_SUCCESS, "%s", fh_last_error());
  free(base);
  lk_free(&P);
  fh_context_destroy(ctx);
}
