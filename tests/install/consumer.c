/* A downstream program built against the installed fusedhead (CMake package or pkg-config).
 * All-zero hidden states give uniform logits, so the loss must be ln V. */
#include <fusedhead.h>
#include <math.h>
#include <stdio.h>

int main(void) {
  float E[2 * 4] = {0}, C[3 * 4] = {0};
  int64_t y[2] = {0, 2};
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CPU, 0) != FH_SUCCESS) return 1;
  fh_linear_ce_options_t opt;
  fh_linear_ce_options_init(&opt);
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, 2, 4), tC = fh_tensor_2d(C, FH_DTYPE_F32, 3, 4);
  float loss = -1.0f;
  fh_linear_ce_outputs_t out = {&loss, NULL, NULL, NULL, NULL, NULL};
  fh_status_t st = fh_linear_ce_forward(ctx, &opt, &tE, &tC, NULL, y, NULL, NULL, &out, NULL, 0);
  fh_context_destroy(ctx);
  printf("consumer: fusedhead %s, status %s, loss %.7f (want %.7f)\n", fh_version(), fh_status_string(st),
         (double)loss, log(3.0));
  return (st == FH_SUCCESS && fabs(loss - log(3.0)) < 1e-6) ? 0 : 1;
}
