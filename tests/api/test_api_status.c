/* Status strings, the thread-local last error, the version, contexts and tensor descriptor
 * validation (through fh_rows_logsumexp, the simplest call that takes a tensor). */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "fusedhead.h"

static void expect_msg(const char* fn, const char* arg) {
  const char* m = fh_last_error();
  cr_expect(strstr(m, fn) != NULL, "message \"%s\" does not name the function %s", m, fn);
  cr_expect(strstr(m, arg) != NULL, "message \"%s\" does not name the argument \"%s\"", m, arg);
}

Test(api_status, strings_from_the_table) {
  const char* seen[FH_STATUS_COUNT] = {0};
  int n = 0;
#define CHECK_(name, value, text)                                                           \
  cr_expect_eq((int)name, value);                                                           \
  cr_expect_str_eq(fh_status_string(name), text);                                          \
  for (int k = 0; k < n; ++k) cr_expect_str_neq(seen[k], text, "duplicate string " #name); \
  seen[n++] = text;
  FH_STATUS_MAP(CHECK_)
#undef CHECK_
  cr_expect_eq(n, (int)FH_STATUS_COUNT, "values are dense from 0");
  cr_expect_eq((int)FH_SUCCESS, 0);
  cr_expect_str_eq(fh_status_string(FH_STATUS_COUNT), "unknown status");
  cr_expect_str_eq(fh_status_string((fh_status_t)-1), "unknown status");
  cr_expect_str_eq(fh_status_string((fh_status_t)1000), "unknown status");
}

Test(api_status, version) {
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", FH_VERSION_MAJOR, FH_VERSION_MINOR, FH_VERSION_PATCH);
  cr_expect_str_eq(fh_version(), want);
  cr_expect_eq(fh_version_number(), FH_VERSION_NUMBER);
  cr_expect_eq(FH_VERSION_NUMBER, FH_VERSION_MAJOR * 10000 + FH_VERSION_MINOR * 100 + FH_VERSION_PATCH);
}

Test(api_status, last_error_set_then_cleared) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(NULL, FH_BACKEND_CPU, 0), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_create", "ctx");
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  cr_expect_str_eq(fh_last_error(), "", "a successful call clears the message");
  fh_context_destroy(ctx);
}

static void* fail_in_thread(void* arg) {
  (void)arg;
  (void)fh_context_get_backend(NULL, NULL);
  static char copy[512];
  snprintf(copy, sizeof copy, "%s", fh_last_error());
  return copy;
}

Test(api_status, last_error_is_thread_local) {
  cr_assert_eq(fh_context_create(NULL, FH_BACKEND_CPU, 0), FH_ERR_INVALID_ARGUMENT);
  char before[512];
  snprintf(before, sizeof before, "%s", fh_last_error());
  pthread_t th;
  cr_assert_eq(pthread_create(&th, NULL, fail_in_thread, NULL), 0);
  void* res = NULL;
  cr_assert_eq(pthread_join(th, &res), 0);
  cr_expect(strstr((const char*)res, "fh_context_get_backend") != NULL, "thread saw \"%s\"", (const char*)res);
  cr_expect_str_eq(fh_last_error(), before, "another thread's error leaked into this one");
}

Test(api_context, cpu_lifecycle) {
  cr_expect_eq(fh_backend_available(FH_BACKEND_CPU), 1);
  cr_expect_eq(fh_backend_available(FH_BACKEND_COUNT), 0);
  cr_expect_eq(fh_backend_available((fh_backend_t)-1), 0);
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  cr_assert_not_null(ctx);
  fh_backend_t b = FH_BACKEND_CUDA;
  cr_expect_eq(fh_context_get_backend(ctx, &b), FH_SUCCESS);
  cr_expect_eq(b, FH_BACKEND_CPU);
  cr_expect_eq(fh_context_set_stream(ctx, NULL), FH_SUCCESS);
  cr_expect_eq(fh_context_set_stream(ctx, (struct CUstream_st*)(uintptr_t)0x10), FH_ERR_INVALID_USAGE);
  expect_msg("fh_context_set_stream", "stream");
  cr_expect_eq(fh_context_check(ctx), FH_SUCCESS);
  cr_expect_eq(fh_context_get_backend(ctx, NULL), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_get_backend", "backend");
  fh_context_destroy(ctx);
  fh_context_destroy(NULL); /* a no-op */
}

Test(api_context, invalid_arguments) {
  fh_context_t* ctx = (fh_context_t*)(uintptr_t)0x1;
  cr_expect_eq(fh_context_create(&ctx, (fh_backend_t)-1, 0), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_create", "backend");
  cr_expect_null(ctx, "*ctx is NULL after a failure");
  cr_expect_eq(fh_context_create(&ctx, FH_BACKEND_COUNT, 0), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_create", "backend");
  cr_expect_eq(fh_context_create(&ctx, FH_BACKEND_CPU, -1), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_create", "device");
  cr_expect_eq(fh_context_set_stream(NULL, NULL), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_set_stream", "ctx");
  fh_backend_t b;
  cr_expect_eq(fh_context_get_backend(NULL, &b), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_get_backend", "ctx");
  cr_expect_eq(fh_context_check(NULL), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_context_check", "ctx");
}

/* Without CUDA compiled in: FH_ERR_UNSUPPORTED with a message. With it (and no GPU here): a
 * context, or FH_ERR_CUDA with a message; never a crash. */
Test(api_context, cuda_backend) {
  fh_context_t* ctx = (fh_context_t*)(uintptr_t)0x1;
  fh_status_t st = fh_context_create(&ctx, FH_BACKEND_CUDA, 0);
  if (!fh_backend_available(FH_BACKEND_CUDA)) {
    cr_expect_eq(st, FH_ERR_UNSUPPORTED, "got %s", fh_status_string(st));
    expect_msg("fh_context_create", "CUDA");
    cr_expect_null(ctx);
  } else if (st == FH_SUCCESS) {
    fh_backend_t b;
    cr_expect_eq(fh_context_get_backend(ctx, &b), FH_SUCCESS);
    cr_expect_eq(b, FH_BACKEND_CUDA);
    fh_context_destroy(ctx);
  } else {
    cr_expect_eq(st, FH_ERR_CUDA, "got %s", fh_status_string(st));
    expect_msg("fh_context_create", "");
    cr_expect_neq(fh_last_error()[0], '\0');
  }
}

Test(api_tensor, dtype_size) {
  cr_expect_eq(fh_dtype_size(FH_DTYPE_F32), 4);
  cr_expect_eq(fh_dtype_size(FH_DTYPE_F16), 2);
  cr_expect_eq(fh_dtype_size(FH_DTYPE_BF16), 2);
  cr_expect_eq(fh_dtype_size(FH_DTYPE_F64), 8);
  cr_expect_eq(fh_dtype_size(FH_DTYPE_COUNT), 0);
  cr_expect_eq(fh_dtype_size((fh_dtype_t)-1), 0);
}

/* The tensor descriptor rules, checked by every call that takes a tensor. */
Test(api_tensor, descriptor_validation) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  float x[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, lse[3];
  fh_tensor_t t = fh_tensor_2d(x, FH_DTYPE_F32, 3, 4);
  cr_expect(t.data == x && t.dtype == FH_DTYPE_F32 && t.rows == 3 && t.cols == 4 && t.row_stride == 4);
  cr_expect_eq(fh_rows_logsumexp(ctx, &t, lse), FH_SUCCESS, "%s", fh_last_error());
  struct {
    fh_tensor_t t;
    const char* arg;
  } bad[] = {
      {{x, FH_DTYPE_COUNT, 3, 4, 4}, "logits->dtype"},   {{x, (fh_dtype_t)-1, 3, 4, 4}, "logits->dtype"},
      {{x, FH_DTYPE_F32, -1, 4, 4}, "logits->rows"},    {{x, FH_DTYPE_F32, 3, -2, 4}, "logits->cols"},
      {{x, FH_DTYPE_F32, 3, 4, 3}, "logits->row_stride"}, {{NULL, FH_DTYPE_F32, 3, 4, 4}, "logits->data"},
      {{x, FH_DTYPE_F32, INT64_MAX / 2, 4, 4}, "logits"},
  };
  for (size_t k = 0; k < sizeof bad / sizeof bad[0]; ++k) {
    cr_expect_eq(fh_rows_logsumexp(ctx, &bad[k].t, lse), FH_ERR_INVALID_ARGUMENT, "case %zu", k);
    expect_msg("fh_rows_logsumexp", bad[k].arg);
  }
  cr_expect_eq(fh_rows_logsumexp(ctx, NULL, lse), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_rows_logsumexp", "logits is NULL");
  cr_expect_eq(fh_rows_logsumexp(ctx, &t, NULL), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_rows_logsumexp", "lse");
  cr_expect_eq(fh_rows_logsumexp(NULL, &t, lse), FH_ERR_INVALID_ARGUMENT);
  expect_msg("fh_rows_logsumexp", "ctx");
  /* empty tensors may have NULL data */
  fh_tensor_t empty = {NULL, FH_DTYPE_BF16, 0, 4, 4};
  cr_expect_eq(fh_rows_logsumexp(ctx, &empty, NULL), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(ctx);
}
