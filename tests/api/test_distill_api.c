/* api/distill: argument validation of the distillation API. Every user error returns a status
 * and a message naming the function and the argument; nothing crashes. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "fusedhead.h"

enum { N = 4, V = 6, DS = 3, VT = 8, DT = 5, K = 3 };

typedef struct api_fx {
  fh_context_t* ctx;
  float Es[N * DS], Cs[V * DS], bs[V], Et[N * DT], Ct[VT * DT], bt[VT];
  fh_tensor_t tEs, tCs, tbs, tEt, tCt, tbt;
  fh_distill_head_t hs, ht;
  int64_t targets[N];
  int64_t ids[N * K];
  float lp[N * K];
  fh_distill_sparse_teacher_t sp;
  fh_distill_options_t o;
  float loss[N], st[N * FH_DISTILL_ROW_STATE];
  fh_distill_outputs_t out;
  float dE[N * DS], dC[V * DS], db[V], gl[N];
  fh_tensor_t tdE, tdC, tdb;
  fh_distill_grads_t g;
  fh_distill_grad_inputs_t in;
} api_fx_t;

static api_fx_t F;

static void setup(void) {
  memset(&F, 0, sizeof F);
  cr_assert(fh_context_create(&F.ctx, FH_BACKEND_CPU, 0) == FH_SUCCESS);
  for (int k = 0; k < N * DS; ++k) F.Es[k] = 0.25f * (float)(k % 5) - 0.5f;
  for (int k = 0; k < V * DS; ++k) F.Cs[k] = 0.125f * (float)(k % 7) - 0.375f;
  for (int k = 0; k < N * DT; ++k) F.Et[k] = 0.5f - 0.25f * (float)(k % 3);
  for (int k = 0; k < VT * DT; ++k) F.Ct[k] = 0.25f * (float)(k % 4) - 0.25f;
  F.tEs = fh_tensor_2d(F.Es, FH_DTYPE_F32, N, DS);
  F.tCs = fh_tensor_2d(F.Cs, FH_DTYPE_F32, V, DS);
  F.tbs = fh_tensor_2d(F.bs, FH_DTYPE_F32, 1, V);
  F.tEt = fh_tensor_2d(F.Et, FH_DTYPE_F32, N, DT);
  F.tCt = fh_tensor_2d(F.Ct, FH_DTYPE_F32, VT, DT);
  F.tbt = fh_tensor_2d(F.bt, FH_DTYPE_F32, 1, VT);
  F.hs = (fh_distill_head_t){&F.tEs, &F.tCs, &F.tbs};
  F.ht = (fh_distill_head_t){&F.tEt, &F.tCt, &F.tbt};
  for (int i = 0; i < N; ++i) {
    F.targets[i] = i % V;
    for (int k = 0; k < K; ++k) {
      F.ids[i * K + k] = (i + 2 * k) % V;
      F.lp[i * K + k] = -1.5f - (float)k; /* Σ e^lp = 0.22 + 0.08 + 0.03 < 1 */
    }
  }
  F.sp = (fh_distill_sparse_teacher_t){F.ids, F.lp, K};
  fh_distill_options_init(&F.o);
  F.out = (fh_distill_outputs_t){F.loss, F.st, NULL, NULL};
  F.tdE = fh_tensor_2d(F.dE, FH_DTYPE_F32, N, DS);
  F.tdC = fh_tensor_2d(F.dC, FH_DTYPE_F32, V, DS);
  F.tdb = fh_tensor_2d(F.db, FH_DTYPE_F32, 1, V);
  F.g = (fh_distill_grads_t){&F.tdE, &F.tdC, &F.tdb};
  F.gl[0] = 1.0f;
  F.in = (fh_distill_grad_inputs_t){F.st, F.gl};
}
static void teardown(void) { fh_context_destroy(F.ctx); }

TestSuite(api_distill, .init = setup, .fini = teardown);

static fh_status_t fwd(void) { return fh_distill_forward(F.ctx, &F.o, &F.hs, &F.ht, F.targets, &F.out, NULL, 0); }
static fh_status_t bwd(void) { return fh_distill_backward(F.ctx, &F.o, &F.hs, &F.ht, F.targets, &F.in, &F.g, NULL, 0); }
static fh_status_t sfwd(void) {
  return fh_distill_sparse_forward(F.ctx, &F.o, &F.hs, &F.sp, F.targets, &F.out, NULL, 0);
}
static fh_status_t sbwd(void) {
  return fh_distill_sparse_backward(F.ctx, &F.o, &F.hs, &F.sp, F.targets, &F.in, &F.g, NULL, 0);
}

/* Asserts the status and that the message contains every fragment. */
static void expect_error(fh_status_t got, fh_status_t want, const char* frag1, const char* frag2) {
  const char* msg = fh_last_error();
  cr_expect(got == want, "status %d (%s), want %d; message \"%s\"", (int)got, fh_status_string(got), (int)want, msg);
  cr_expect(strstr(msg, frag1) != NULL, "message \"%s\" lacks \"%s\"", msg, frag1);
  if (frag2) cr_expect(strstr(msg, frag2) != NULL, "message \"%s\" lacks \"%s\"", msg, frag2);
}

Test(api_distill, defaults) {
  fh_distill_options_t o;
  memset(&o, 0xff, sizeof o);
  fh_distill_options_init(&o);
  cr_expect(o.struct_size == sizeof o && o.divergence == FH_DISTILL_FORWARD_KL && o.beta == 0.5f &&
            o.jsd_endpoints == FH_DISTILL_JSD_ENDPOINTS_KL && o.skew == 0.1f && o.alpha == 0.5f &&
            o.temperature == 1.0f && o.scale_by_t_squared == 1 && o.soft_weight == 1.0f && o.hard_weight == 0.0f &&
            o.ignore_index == -100 && o.reduction == FH_REDUCTION_MEAN && o.divisor == 0.0f &&
            o.sparse_mass == FH_DISTILL_SPARSE_RENORMALIZE && o.accum_mode == FH_ACCUM_FP32 && o.accumulate == 0);
  fh_distill_options_init(NULL); /* no crash */
}

Test(api_distill, valid_calls_succeed_and_clear_the_error) {
  cr_assert(fwd() == FH_SUCCESS, "%s", fh_last_error());
  cr_assert(bwd() == FH_SUCCESS, "%s", fh_last_error());
  cr_assert(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  cr_assert(sbwd() == FH_SUCCESS, "%s", fh_last_error());
  cr_expect(strcmp(fh_last_error(), "") == 0 && isfinite(F.loss[0]));
  /* the teacher's dtype may differ from the student's */
  uint16_t Et[N * DT] = {0}, Ct[VT * DT] = {0};
  fh_tensor_t tEt = fh_tensor_2d(Et, FH_DTYPE_BF16, N, DT), tCt = fh_tensor_2d(Ct, FH_DTYPE_BF16, VT, DT);
  F.ht = (fh_distill_head_t){&tEt, &tCt, NULL};
  cr_expect(fwd() == FH_SUCCESS, "%s", fh_last_error());
}

Test(api_distill, context_and_options) {
  expect_error(fh_distill_forward(NULL, &F.o, &F.hs, &F.ht, NULL, &F.out, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_forward", "ctx is NULL");
  expect_error(fh_distill_backward(F.ctx, NULL, &F.hs, &F.ht, NULL, &F.in, &F.g, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_backward", "opts is NULL");
  F.o.struct_size = 8;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "opts->struct_size", "init");
}

/* One option set out of range per call: status, function and argument in the message. */
#define BAD_OPTION(stmt, arg)                                      \
  do {                                                             \
    fh_distill_options_init(&F.o);                                 \
    stmt;                                                          \
    expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "fh_distill_forward", arg); \
  } while (0)

Test(api_distill, option_ranges) {
  BAD_OPTION(F.o.divergence = (fh_distill_divergence_t)99, "opts->divergence");
  BAD_OPTION(F.o.jsd_endpoints = (fh_distill_jsd_endpoints_t)5, "opts->jsd_endpoints");
  BAD_OPTION(F.o.reduction = (fh_reduction_t)-1, "opts->reduction");
  BAD_OPTION(F.o.sparse_mass = (fh_distill_sparse_mass_t)3, "opts->sparse_mass");
  BAD_OPTION(F.o.accum_mode = (fh_accum_mode_t)9, "opts->accum_mode");
  BAD_OPTION(F.o.beta = 1.5f, "opts->beta");
  BAD_OPTION(F.o.beta = NAN, "opts->beta");
  BAD_OPTION(F.o.skew = -0.1f, "opts->skew");
  BAD_OPTION(F.o.alpha = INFINITY, "opts->alpha");
  BAD_OPTION(F.o.temperature = 0.0f, "opts->temperature");
  BAD_OPTION(F.o.temperature = -1.0f, "opts->temperature");
  BAD_OPTION(F.o.temperature = INFINITY, "opts->temperature");
  BAD_OPTION(F.o.soft_weight = NAN, "opts->soft_weight");
  BAD_OPTION(F.o.hard_weight = INFINITY, "opts->hard_weight");
  BAD_OPTION(F.o.divisor = -1.0f, "opts->divisor");
}

Test(api_distill, heads) {
  fh_distill_head_t h = F.hs;
  expect_error(fh_distill_forward(F.ctx, &F.o, NULL, &F.ht, NULL, &F.out, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_forward", "student is NULL");
  expect_error(fh_distill_forward(F.ctx, &F.o, &F.hs, NULL, NULL, &F.out, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_forward", "teacher is NULL");
  F.hs.E = NULL;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "student->E", "NULL");
  F.hs = h;
  fh_tensor_t bad = fh_tensor_2d(F.Cs, FH_DTYPE_F32, V / 2, 2 * DS);
  F.hs.C = &bad;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "student->C->cols", "expected 3");
  bad = fh_tensor_2d(F.Cs, FH_DTYPE_F16, V, DS);
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "student->C->dtype", NULL);
  F.hs = h;
  bad = fh_tensor_2d(F.bs, FH_DTYPE_F32, 1, V - 1);
  F.hs.bias = &bad;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "student->bias->cols", NULL);
  F.hs = h;
  bad = fh_tensor_2d(F.Et, FH_DTYPE_F32, N - 1, DT);
  F.ht.E = &bad;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "teacher->E->rows", "expected 4");
  F.ht.E = &F.tEt;
  bad = fh_tensor_2d(F.Ct, FH_DTYPE_F32, V - 1, DT);
  F.ht.C = &bad;
  F.ht.bias = NULL;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "V_t", "must be >= V");
  bad = fh_tensor_2d(F.Ct, FH_DTYPE_F32, VT, DT);
  bad.row_stride = DT - 1;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "teacher->C->row_stride", NULL);
}

Test(api_distill, targets) {
  F.o.hard_weight = 0.5f;
  expect_error(fh_distill_forward(F.ctx, &F.o, &F.hs, &F.ht, NULL, &F.out, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "targets is NULL", "hard_weight");
  F.targets[2] = 500;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "targets[2] is 500", NULL);
  F.targets[2] = -100; /* ignore_index is fine */
  cr_expect(fwd() == FH_SUCCESS, "%s", fh_last_error());
}

Test(api_distill, outputs_and_backward_inputs) {
  expect_error(fh_distill_forward(F.ctx, &F.o, &F.hs, &F.ht, NULL, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT, "out is NULL",
               NULL);
  F.out.loss = NULL;
  expect_error(fwd(), FH_ERR_INVALID_ARGUMENT, "out->loss is NULL", NULL);
  F.out.row_state = NULL; /* optional in the forward */
  F.out.loss = F.loss;
  cr_expect(fwd() == FH_SUCCESS, "%s", fh_last_error());
  expect_error(fh_distill_backward(F.ctx, &F.o, &F.hs, &F.ht, NULL, NULL, &F.g, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "in is NULL", NULL);
  expect_error(fh_distill_backward(F.ctx, &F.o, &F.hs, &F.ht, NULL, &F.in, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "grads is NULL", NULL);
  F.in.row_state = NULL;
  expect_error(bwd(), FH_ERR_INVALID_ARGUMENT, "in->row_state is NULL", NULL);
  F.in.row_state = F.st;
  F.in.grad_loss = NULL;
  expect_error(bwd(), FH_ERR_INVALID_ARGUMENT, "in->grad_loss is NULL", NULL);
  F.in.grad_loss = F.gl;
  fh_tensor_t alias = fh_tensor_2d(F.Es, FH_DTYPE_F32, N, DS);
  F.g.dE = &alias;
  expect_error(bwd(), FH_ERR_INVALID_ARGUMENT, "grads->dE aliases an input", NULL);
  fh_tensor_t wrong = fh_tensor_2d(F.dE, FH_DTYPE_BF16, N, DS);
  F.g.dE = &wrong;
  expect_error(bwd(), FH_ERR_INVALID_ARGUMENT, "grads->dE->dtype", NULL);
  F.g.dE = &F.tdE;
  F.hs.bias = NULL;
  expect_error(bwd(), FH_ERR_INVALID_ARGUMENT, "grads->dbias", "no bias");
  F.hs.bias = &F.tbs;
  _Alignas(FH_WORKSPACE_ALIGNMENT) char buf[16]; /* an (aligned) workspace is accepted though 0 bytes are needed */
  expect_error(fh_distill_forward(F.ctx, &F.o, &F.hs, &F.ht, NULL, &F.out, buf, sizeof buf), FH_SUCCESS, "", NULL);
}

Test(api_distill, sparse_teacher) {
  expect_error(fh_distill_sparse_forward(F.ctx, &F.o, &F.hs, NULL, NULL, &F.out, NULL, 0), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_sparse_forward", "teacher is NULL");
  F.sp.K = 0;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->K is 0", NULL);
  F.sp.K = V + 1;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->K is 7", "more than V");
  F.sp.K = K;
  F.sp.ids = NULL;
  expect_error(sbwd(), FH_ERR_INVALID_ARGUMENT, "fh_distill_sparse_backward", "teacher->ids is NULL");
  F.sp.ids = F.ids;
  F.ids[1 * K + 2] = V;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->ids[1][2] is 6", "[0, 6)");
  F.ids[1 * K + 2] = F.ids[1 * K + 0];
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->ids[1] holds id", "twice");
  F.targets[1] = -100; /* an ignored row is never read, so its ids are not checked */
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  F.targets[1] = 1;
  F.ids[1 * K + 2] = 5;
  F.lp[2 * K + 1] = NAN;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->logprobs[2][1] is nan", NULL);
  F.lp[2 * K + 1] = INFINITY;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->logprobs[2][1] is inf", NULL);
  for (int k = 0; k < K; ++k) F.lp[2 * K + k] = -INFINITY;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->logprobs[2] is all -inf", NULL);
  F.lp[2 * K] = -1.0f; /* one finite entry is enough */
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  F.o.sparse_mass = FH_DISTILL_SPARSE_REMAINDER;
  F.o.temperature = 2.0f;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "opts->temperature is 2", "REMAINDER needs 1");
  F.o.temperature = 1.0f;
  F.lp[3 * K] = -0.01f; /* 0.99 + 0.08 + 0.03 > 1 + 1e-3 */
  F.lp[3 * K + 1] = -2.5f;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "teacher->logprobs[3] has total probability", NULL);
  F.o.sparse_mass = FH_DISTILL_SPARSE_RENORMALIZE; /* renormalize accepts any reals */
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  F.o.divergence = FH_DISTILL_JSD; /* renormalize: finite off the support */
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  F.o.divergence = FH_DISTILL_REVERSE_KL; /* f(0) = +inf: only with the remainder bucket */
  expect_error(sfwd(), FH_ERR_UNSUPPORTED, "mass off the teacher's support", "FH_DISTILL_SPARSE_REMAINDER");
  F.o.divergence = FH_DISTILL_ALPHA, F.o.alpha = 0.0f;
  expect_error(sfwd(), FH_ERR_UNSUPPORTED, "f(0) = +inf", NULL);
  F.o.alpha = 0.5f;
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  F.o.sparse_mass = FH_DISTILL_SPARSE_NONE;
  expect_error(sfwd(), FH_ERR_UNSUPPORTED, "SPARSE_NONE supports only FH_DISTILL_FORWARD_KL", NULL);
  F.o.divergence = FH_DISTILL_FORWARD_KL;
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
  F.o.temperature = 2.0f;
  expect_error(sfwd(), FH_ERR_INVALID_ARGUMENT, "opts->temperature is 2", "NONE needs 1");
  F.o.temperature = 1.0f;
  F.o.sparse_mass = FH_DISTILL_SPARSE_REMAINDER, F.o.divergence = FH_DISTILL_REVERSE_KL;
  F.lp[3 * K] = -1.0f;
  cr_expect(sfwd() == FH_SUCCESS, "%s", fh_last_error());
}

Test(api_distill, workspace_queries) {
  fh_distill_shape_t sh = {N, V, DS, VT, DT, 0, FH_DTYPE_F32, FH_DTYPE_BF16};
  size_t bytes = 99;
  cr_expect(fh_distill_forward_workspace_size(F.ctx, &F.o, &sh, &bytes) == FH_SUCCESS && bytes == 0);
  bytes = 99;
  cr_expect(fh_distill_backward_workspace_size(F.ctx, &F.o, &sh, &bytes) == FH_SUCCESS && bytes == 0);
  expect_error(fh_distill_forward_workspace_size(F.ctx, &F.o, NULL, &bytes), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_forward_workspace_size", "shape is NULL");
  expect_error(fh_distill_backward_workspace_size(F.ctx, &F.o, &sh, NULL), FH_ERR_INVALID_ARGUMENT,
               "fh_distill_backward_workspace_size", "bytes is NULL");
  sh.N = -1;
  expect_error(fh_distill_forward_workspace_size(F.ctx, &F.o, &sh, &bytes), FH_ERR_INVALID_ARGUMENT, "negative", NULL);
  sh.N = N, sh.V_t = V - 1;
  expect_error(fh_distill_forward_workspace_size(F.ctx, &F.o, &sh, &bytes), FH_ERR_INVALID_ARGUMENT,
               "shape->V_t is 5", NULL);
  sh.K = 4, sh.V_t = 0, sh.D_t = 0; /* sparse: no teacher head */
  cr_expect(fh_distill_forward_workspace_size(F.ctx, &F.o, &sh, &bytes) == FH_SUCCESS, "%s", fh_last_error());
  sh.dtype_s = FH_DTYPE_COUNT;
  expect_error(fh_distill_forward_workspace_size(F.ctx, &F.o, &sh, &bytes), FH_ERR_INVALID_ARGUMENT,
               "shape->dtype_s", NULL);
  expect_error(fh_distill_forward_workspace_size(NULL, &F.o, &sh, &bytes), FH_ERR_INVALID_ARGUMENT, "ctx is NULL",
               NULL);
}
