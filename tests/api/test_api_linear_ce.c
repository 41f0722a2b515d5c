/* Every linear cross-entropy validation error: each returns its status, and fh_last_error()
 * names the function and the argument. Bad input must never crash or write outputs. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lce_fixture.h"
#include "test_util.h"

static const char FWD[] = "fh_linear_ce_forward";
static const char BWD[] = "fh_linear_ce_backward";

/* A small valid problem and every buffer both calls need; each case breaks one thing. */
typedef struct setup {
  fh_context_t* ctx;
  fh_context_t* own; /* cases may set ctx to NULL; this one is destroyed */
  lce_fix_t f;
  fh_tensor_t E, C, b;
  const int64_t* targets;
  const float *cw, *tw;
  fh_linear_ce_options_t opt;
  float loss[5], lse[5], ent[5], gl[5];
  fh_linear_ce_outputs_t out;
  fh_linear_ce_grad_inputs_t in;
  float dE[5 * 3], dC[7 * 3], db[7];
  fh_tensor_t tdE, tdC, tdb;
  fh_linear_ce_grads_t grads;
} setup_t;

static setup_t S;

static void setup_init(void) {
  memset(&S, 0, sizeof S);
  cr_assert_eq(fh_context_create(&S.ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  S.own = S.ctx;
  lce_fix_spec_t s = lce_fix_default_spec(401);
  s.N = 5;
  s.V = 7;
  s.D = 3;
  s.class_weights = s.token_weights = 1;
  lce_fix_init(&S.f, &s);
  S.E = S.f.tE;
  S.C = S.f.tC;
  S.b = S.f.tb;
  S.targets = S.f.targets;
  S.cw = S.f.cw;
  S.tw = S.f.tw;
  fh_linear_ce_options_init(&S.opt);
  S.opt.entropy_weight = 0.5f;
  S.out = (fh_linear_ce_outputs_t){S.loss, S.lse, S.ent, NULL, NULL, NULL};
  for (int i = 0; i < 5; ++i) S.gl[i] = 1.0f;
  S.in = (fh_linear_ce_grad_inputs_t){S.lse, S.ent, S.gl, NULL};
  S.tdE = fh_tensor_2d(S.dE, FH_DTYPE_F32, 5, 3);
  S.tdC = fh_tensor_2d(S.dC, FH_DTYPE_F32, 7, 3);
  S.tdb = fh_tensor_2d(S.db, FH_DTYPE_F32, 1, 7);
  S.grads = (fh_linear_ce_grads_t){&S.tdE, &S.tdC, &S.tdb};
}

static void setup_fini(void) {
  lce_fix_free(&S.f);
  fh_context_destroy(S.own);
}

static fh_status_t fwd(void) {
  return fh_linear_ce_forward(S.ctx, &S.opt, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, &S.out, NULL, 0);
}
static fh_status_t bwd(void) {
  return fh_linear_ce_backward(S.ctx, &S.opt, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, &S.in, &S.grads, NULL, 0);
}

static void expect_error(fh_status_t st, const char* fn, const char* arg, const char* what) {
  const char* m = fh_last_error();
  cr_expect_eq(st, FH_ERR_INVALID_ARGUMENT, "%s: status %s", what, fh_status_string(st));
  cr_expect(strstr(m, fn) != NULL, "%s: message \"%s\" does not name %s", what, m, fn);
  cr_expect(strstr(m, arg) != NULL, "%s: message \"%s\" does not name \"%s\"", what, m, arg);
}

/* Run a case against both calls: `mutate` breaks the setup, the error must name `arg`. */
#define BOTH(what, arg, mutate)                 \
  do {                                          \
    setup_fini();                               \
    setup_init();                               \
    mutate;                                     \
    expect_error(fwd(), FWD, arg, what " (forward)"); \
    setup_fini();                               \
    setup_init();                               \
    mutate;                                     \
    expect_error(bwd(), BWD, arg, what " (backward)"); \
  } while (0)

#define BWD_ONLY(what, arg, mutate)             \
  do {                                          \
    setup_fini();                               \
    setup_init();                               \
    mutate;                                     \
    expect_error(bwd(), BWD, arg, what);        \
  } while (0)

TestSuite(api_linear_ce, .init = setup_init, .fini = setup_fini);

Test(api_linear_ce, valid_setup_succeeds_and_clears_error) {
  (void)fh_context_create(NULL, FH_BACKEND_CPU, 0);
  cr_assert_eq(fwd(), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_str_eq(fh_last_error(), "");
  cr_assert_eq(bwd(), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_str_eq(fh_last_error(), "");
}

Test(api_linear_ce, null_pointers) {
  BOTH("ctx NULL", "ctx", S.ctx = NULL);
  /* pointers passed directly to the calls */
  setup_fini();
  setup_init();
  {
    fh_status_t st = fh_linear_ce_forward(S.ctx, NULL, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, &S.out, NULL, 0);
    expect_error(st, FWD, "opts is NULL", "opts NULL");
  }
  {
    fh_status_t st = fh_linear_ce_backward(S.ctx, NULL, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, &S.in, &S.grads,
                                           NULL, 0);
    expect_error(st, BWD, "opts is NULL", "opts NULL (backward)");
    st = fh_linear_ce_forward(S.ctx, &S.opt, NULL, &S.C, &S.b, S.targets, S.cw, S.tw, &S.out, NULL, 0);
    expect_error(st, FWD, "E is NULL", "E NULL");
    st = fh_linear_ce_forward(S.ctx, &S.opt, &S.E, NULL, &S.b, S.targets, S.cw, S.tw, &S.out, NULL, 0);
    expect_error(st, FWD, "C is NULL", "C NULL");
    st = fh_linear_ce_backward(S.ctx, &S.opt, NULL, &S.C, &S.b, S.targets, S.cw, S.tw, &S.in, &S.grads, NULL, 0);
    expect_error(st, BWD, "E is NULL", "E NULL (backward)");
    st = fh_linear_ce_backward(S.ctx, &S.opt, &S.E, NULL, &S.b, S.targets, S.cw, S.tw, &S.in, &S.grads, NULL, 0);
    expect_error(st, BWD, "C is NULL", "C NULL (backward)");
    st = fh_linear_ce_forward(S.ctx, &S.opt, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, NULL, NULL, 0);
    expect_error(st, FWD, "out is NULL", "out NULL");
    st = fh_linear_ce_backward(S.ctx, &S.opt, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, NULL, &S.grads, NULL, 0);
    expect_error(st, BWD, "in is NULL", "in NULL");
    st = fh_linear_ce_backward(S.ctx, &S.opt, &S.E, &S.C, &S.b, S.targets, S.cw, S.tw, &S.in, NULL, NULL, 0);
    expect_error(st, BWD, "grads is NULL", "grads NULL");
  }
  BOTH("targets NULL", "targets", S.targets = NULL);
  BOTH("E data NULL", "E->data", S.E.data = NULL);
  BOTH("C data NULL", "C->data", S.C.data = NULL);
  BOTH("bias data NULL", "bias->data", S.b.data = NULL);
  setup_fini();
  setup_init();
  S.out.loss = NULL;
  expect_error(fwd(), FWD, "out->loss", "out->loss NULL");
  BWD_ONLY("in->lse NULL", "in->lse", S.in.lse = NULL);
  BWD_ONLY("in->grad_loss NULL", "in->grad_loss", S.in.grad_loss = NULL);
  BWD_ONLY("in->entropy NULL with entropy_weight", "in->entropy", S.in.entropy = NULL);
}

/* N = 0: targets, lse, E data may be NULL; out->loss is still required. */
Test(api_linear_ce, n_zero_allows_null_row_buffers) {
  S.E = (fh_tensor_t){NULL, FH_DTYPE_F32, 0, 3, 3};
  S.targets = NULL;
  S.tw = NULL;
  S.in.lse = NULL;
  S.in.entropy = NULL;
  S.tdE = (fh_tensor_t){NULL, FH_DTYPE_F32, 0, 3, 3};
  cr_expect_eq(fwd(), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(bwd(), FH_SUCCESS, "%s", fh_last_error());
  S.out.loss = NULL;
  expect_error(fwd(), FWD, "out->loss", "out->loss NULL with N = 0");
}

Test(api_linear_ce, sizes_and_shapes) {
  BOTH("E rows < 0", "E->rows", S.E.rows = -1);
  BOTH("E cols < 0", "E->cols", S.E.cols = -3);
  BOTH("C rows < 0", "C->rows", S.C.rows = -7);
  BOTH("C cols != D", "C->cols", S.C.cols = 2);
  BOTH("V = 0 with N > 0", "C->rows", {
    S.C.rows = 0;
    S.b.cols = 0;
  });
  BOTH("bias rows != 1", "bias->rows", S.b.rows = 2);
  BOTH("bias cols != V", "bias->cols", S.b.cols = 6);
  BOTH("E stride < cols", "E->row_stride", S.E.row_stride = 2);
  BOTH("C stride < cols", "C->row_stride", S.C.row_stride = 0);
  BOTH("bias stride < cols", "bias->row_stride", S.b.row_stride = 6);
  BOTH("E rows * stride overflows", "E", {
    S.E.rows = INT64_MAX / 2;
    S.targets = NULL;
  });
}

Test(api_linear_ce, dtypes) {
  BOTH("E dtype out of range", "E->dtype", S.E.dtype = FH_DTYPE_COUNT);
  BOTH("E dtype negative", "E->dtype", S.E.dtype = (fh_dtype_t)-1);
  BOTH("C dtype mismatch", "C->dtype", S.C.dtype = FH_DTYPE_BF16);
  BOTH("C dtype out of range", "C->dtype", S.C.dtype = (fh_dtype_t)7);
  BOTH("bias dtype mismatch", "bias->dtype", S.b.dtype = FH_DTYPE_F16);
}

Test(api_linear_ce, targets_out_of_range) {
  int64_t t[5];
  memcpy(t, S.f.targets, sizeof t);
  t[2] = 1; /* the fixture ignores row 2; here every other row is valid */
  t[3] = 7; /* = V */
  BOTH("target = V", "targets[3]", S.targets = t);
  t[3] = -1; /* negative, not ignore_index */
  BOTH("target -1", "targets[3]", S.targets = t);
  t[3] = INT64_MIN;
  BOTH("target INT64_MIN", "targets[3]", S.targets = t);
  t[3] = -100; /* ignore_index 5: -100 is now an error */
  BOTH("-100 with another ignore_index", "targets[3]", {
    S.targets = t;
    S.opt.ignore_index = 5;
  });
  /* and the ignore_index itself is never range-checked */
  setup_fini();
  setup_init();
  t[3] = 123456;
  S.targets = t;
  S.opt.ignore_index = 123456;
  cr_expect_eq(fwd(), FH_SUCCESS, "%s", fh_last_error());
}

Test(api_linear_ce, option_ranges) {
  BOTH("softcap < 0", "opts->softcap", S.opt.softcap = -1.0f);
  BOTH("softcap NaN", "opts->softcap", S.opt.softcap = NAN);
  BOTH("softcap inf", "opts->softcap", S.opt.softcap = INFINITY);
  BOTH("label_smoothing < 0", "opts->label_smoothing", S.opt.label_smoothing = -0.01f);
  BOTH("label_smoothing > 1", "opts->label_smoothing", S.opt.label_smoothing = 1.01f);
  BOTH("label_smoothing NaN", "opts->label_smoothing", S.opt.label_smoothing = NAN);
  BOTH("logit_scale 0", "opts->logit_scale", S.opt.logit_scale = 0.0f);
  BOTH("logit_scale < 0", "opts->logit_scale", S.opt.logit_scale = -2.0f);
  BOTH("logit_scale NaN", "opts->logit_scale", S.opt.logit_scale = NAN);
  BOTH("logit_scale inf", "opts->logit_scale", S.opt.logit_scale = INFINITY);
  BOTH("z_loss_scale < 0", "opts->z_loss_scale", S.opt.z_loss_scale = -1e-4f);
  BOTH("z_loss_scale NaN", "opts->z_loss_scale", S.opt.z_loss_scale = NAN);
  BOTH("entropy_weight NaN", "opts->entropy_weight", S.opt.entropy_weight = NAN);
  BOTH("entropy_weight -inf", "opts->entropy_weight", S.opt.entropy_weight = -INFINITY);
  BOTH("divisor < 0", "opts->divisor", S.opt.divisor = -1.0f);
  BOTH("divisor NaN", "opts->divisor", S.opt.divisor = NAN);
  BOTH("filter_eps < 0", "opts->filter_eps", S.opt.filter_eps = -0.5f);
  BOTH("filter_eps NaN", "opts->filter_eps", S.opt.filter_eps = NAN);
  BOTH("reduction out of range", "opts->reduction", S.opt.reduction = FH_REDUCTION_COUNT);
  BOTH("reduction negative", "opts->reduction", S.opt.reduction = (fh_reduction_t)-1);
  BOTH("accum_mode out of range", "opts->accum_mode", S.opt.accum_mode = FH_ACCUM_MODE_COUNT);
  BOTH("struct_size 0", "struct_size", S.opt.struct_size = 0);
  BOTH("struct_size too small", "struct_size", S.opt.struct_size = offsetof(fh_linear_ce_options_t, reduction));
  /* the edges that are valid */
  setup_fini();
  setup_init();
  S.opt.label_smoothing = 1.0f;
  S.opt.entropy_weight = -3.0f;
  S.opt.softcap = 0.0f;
  S.opt.filter_eps = 0.0f;
  cr_expect_eq(fwd(), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(bwd(), FH_SUCCESS, "%s", fh_last_error());
}

Test(api_linear_ce, weights) {
  float cw[7], tw[5];
  memcpy(cw, S.f.cw, sizeof cw);
  memcpy(tw, S.f.tw, sizeof tw);
  cw[4] = -1.0f;
  BOTH("class weight < 0", "class_weights[4]", S.cw = cw);
  cw[4] = NAN;
  BOTH("class weight NaN", "class_weights[4]", S.cw = cw);
  cw[4] = INFINITY;
  BOTH("class weight inf", "class_weights[4]", S.cw = cw);
  tw[2] = -0.5f;
  BOTH("token weight < 0", "token_weights[2]", S.tw = tw);
  tw[2] = NAN;
  BOTH("token weight NaN", "token_weights[2]", S.tw = tw);
  /* fp64 inputs: the weights are read as double */
  double E64[15] = {0}, C64[21] = {0}, b64[7] = {0}, cw64[7] = {1, 1, 1, 1, 1, 1, 1}, tw64[5] = {1, 1, 1, 1, -2};
  BOTH("fp64 token weight < 0", "token_weights[4]", {
    S.E = fh_tensor_2d(E64, FH_DTYPE_F64, 5, 3);
    S.C = fh_tensor_2d(C64, FH_DTYPE_F64, 7, 3);
    S.b = fh_tensor_2d(b64, FH_DTYPE_F64, 1, 7);
    S.cw = (const float*)cw64;
    S.tw = (const float*)tw64;
    S.tdE.dtype = S.tdC.dtype = S.tdb.dtype = FH_DTYPE_F64;
  });
}

Test(api_linear_ce, gradient_tensors) {
  BWD_ONLY("dE rows", "grads->dE->rows", S.tdE.rows = 4);
  BWD_ONLY("dE cols", "grads->dE->cols", S.tdE.cols = 4);
  BWD_ONLY("dE stride", "grads->dE->row_stride", S.tdE.row_stride = 2);
  BWD_ONLY("dE dtype", "grads->dE->dtype", S.tdE.dtype = FH_DTYPE_BF16);
  BWD_ONLY("dC rows", "grads->dC->rows", S.tdC.rows = 8);
  BWD_ONLY("dC cols", "grads->dC->cols", S.tdC.cols = 2);
  BWD_ONLY("dC dtype out of range", "grads->dC->dtype", S.tdC.dtype = FH_DTYPE_COUNT);
  BWD_ONLY("dbias cols", "grads->dbias->cols", S.tdb.cols = 8);
  BWD_ONLY("dbias rows", "grads->dbias->rows", S.tdb.rows = 7);
  setup_fini();
  setup_init();
  fh_status_t st =
      fh_linear_ce_backward(S.ctx, &S.opt, &S.E, &S.C, NULL, S.targets, S.cw, S.tw, &S.in, &S.grads, NULL, 0);
  expect_error(st, BWD, "grads->dbias", "dbias without bias");
  cr_expect(strstr(fh_last_error(), "no bias") != NULL, "%s", fh_last_error());
}

/* A gradient buffer that is an input's buffer. */
Test(api_linear_ce, gradient_aliasing_an_input) {
  S.tdE.data = S.E.data;
  expect_error(bwd(), BWD, "grads->dE", "dE aliases E");
  cr_expect(strstr(fh_last_error(), "alias") != NULL, "%s", fh_last_error());
  setup_fini();
  setup_init();
  S.tdC.data = S.C.data;
  expect_error(bwd(), BWD, "grads->dC", "dC aliases C");
  setup_fini();
  setup_init();
  S.tdb.data = S.b.data;
  expect_error(bwd(), BWD, "grads->dbias", "dbias aliases bias");
  setup_fini();
  setup_init();
  /* dC over E's memory (shapes differ, so make E the same shape as C: V x D) */
  float Ebig[7 * 3] = {0};
  S.E = fh_tensor_2d(Ebig, FH_DTYPE_F32, 5, 3);
  S.tdC.data = Ebig;
  expect_error(bwd(), BWD, "grads->dC", "dC aliases E");
}

/* A rejected call writes nothing. */
Test(api_linear_ce, failure_writes_nothing) {
  for (int k = 0; k < 5; ++k) S.loss[k] = S.lse[k] = -7.0f;
  for (int k = 0; k < 21; ++k) S.dC[k] = -7.0f;
  S.opt.softcap = -1.0f;
  cr_expect_neq(fwd(), FH_SUCCESS);
  cr_expect_neq(bwd(), FH_SUCCESS);
  int touched = 0;
  for (int k = 0; k < 5; ++k) touched += S.loss[k] != -7.0f || S.lse[k] != -7.0f;
  for (int k = 0; k < 21; ++k) touched += S.dC[k] != -7.0f;
  cr_expect_eq(touched, 0);
}

Test(api_linear_ce, workspace_queries) {
  static const char* fns[2] = {"fh_linear_ce_forward_workspace_size", "fh_linear_ce_backward_workspace_size"};
  for (int k = 0; k < 2; ++k) {
    fh_status_t (*q)(fh_context_t*, const fh_linear_ce_options_t*, int64_t, int64_t, int64_t, fh_dtype_t, size_t*) =
        k ? fh_linear_ce_backward_workspace_size : fh_linear_ce_forward_workspace_size;
    size_t bytes = 99;
    cr_expect_eq(q(S.ctx, &S.opt, 5, 7, 3, FH_DTYPE_BF16, &bytes), FH_SUCCESS, "%s", fh_last_error());
    cr_expect_eq(bytes, 0, "the CPU reference needs no workspace");
    expect_error(q(NULL, &S.opt, 5, 7, 3, FH_DTYPE_F32, &bytes), fns[k], "ctx", "ws ctx");
    expect_error(q(S.ctx, NULL, 5, 7, 3, FH_DTYPE_F32, &bytes), fns[k], "opts", "ws opts");
    expect_error(q(S.ctx, &S.opt, -1, 7, 3, FH_DTYPE_F32, &bytes), fns[k], "N", "ws N");
    expect_error(q(S.ctx, &S.opt, 5, -7, 3, FH_DTYPE_F32, &bytes), fns[k], "V", "ws V");
    expect_error(q(S.ctx, &S.opt, 5, 7, -3, FH_DTYPE_F32, &bytes), fns[k], "D", "ws D");
    expect_error(q(S.ctx, &S.opt, 5, 7, 3, FH_DTYPE_COUNT, &bytes), fns[k], "dtype", "ws dtype");
    expect_error(q(S.ctx, &S.opt, 5, 7, 3, FH_DTYPE_F32, NULL), fns[k], "bytes", "ws bytes");
    S.opt.softcap = -1.0f;
    expect_error(q(S.ctx, &S.opt, 5, 7, 3, FH_DTYPE_F32, &bytes), fns[k], "opts->softcap", "ws softcap");
    S.opt.softcap = 0.0f;
  }
}

/* Options from an older, smaller struct keep the defaults of the appended fields. */
Test(api_linear_ce, options_init_defaults) {
  fh_linear_ce_options_t o;
  memset(&o, 0xCD, sizeof o);
  fh_linear_ce_options_init(&o);
  cr_expect_eq(o.struct_size, sizeof o);
  cr_expect_eq(o.ignore_index, -100);
  cr_expect_eq(o.reduction, FH_REDUCTION_MEAN);
  cr_expect(o.softcap == 0 && o.label_smoothing == 0 && o.logit_scale == 1 && o.z_loss_scale == 0 &&
            o.entropy_weight == 0 && o.divisor == 0 && o.filter_eps == FH_FILTER_EPS_AUTO);
  cr_expect(o.filter_e_grad == 1 && o.filter_c_grad == 1 && o.accum_mode == FH_ACCUM_FP32 && o.accumulate == 0);
  fh_linear_ce_options_init(NULL); /* no crash */
}
