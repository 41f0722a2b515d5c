/* kernel_distill_precision: fp32 distillation on the CUDA backend keeps fp32 accuracy on saturated
 * rows (docs/linear_ce.md "Precision", docs/distillation_cuda.md "Accuracy").
 *
 * Both heads' hidden states are drawn with standard deviation 1, 1e2 and 1e4, so the tempered
 * logits reach about 1e1, 1e3 and 1e5 and most rows of both softmaxes are one-hot. The forward
 * and the backward (all three accumulation modes) are compared with the fp64 reference under the
 * rule of docs/testing.md, the yardstick being the naive fp32 computation with log-softmax formed
 * as (x − m) − ln Z (PyTorch's fp32 way). The forward forms X and Y that way too; the fp32
 * backward recomputes m and ln Z (the row state's fp32 lse would put 2^-24 |lse| into every
 * probability: the backward checks fail with it, checked when the test was written). */
#include <criterion/criterion.h>
#include <stdio.h>

#include "test_distill_common.h"

Test(kernel_distill_precision, fp32_saturated_rows_at_scales_1_1e2_1e4, .timeout = 900) {
  static const fh_distill_divergence_t divs[] = {FH_DISTILL_TVD, FH_DISTILL_REVERSE_KL, FH_DISTILL_FORWARD_KL,
                                                 FH_DISTILL_JSD};
  static const char* const names[] = {"tvd", "reverse_kl", "forward_kl", "jsd"};
  static const double scales[] = {1.0, 1e2, 1e4};
  for (int d = 0; d < 4; ++d)
    for (int q = 0; q < 3; ++q) {
      dk_spec_t s = dk_default(6, 9, 4, 9, 5, FH_DTYPE_F32); /* small: one row weighs 1/5 of the mean */
      s.e_mul = scales[q];
      s.seed = 77 + (uint64_t)(10 * d + q);
      dk_problem_t P;
      dk_init(&P, &s);
      fh_distill_options_t o = dk_opts(divs[d], 0.5f);
      o.reduction = FH_REDUCTION_MEAN;
      char label[96];
      snprintf(label, sizeof label, "precision/%s/scale %g", names[d], scales[q]);
      cr_expect(dk_check_forward(label, &P, &o, NULL), "%s forward", label);
      for (int m = 0; m < 3; ++m) {
        o.accum_mode = (fh_accum_mode_t)m;
        cr_expect(dk_check_backward(label, &P, &o, NULL), "%s backward %s", label, DK_MODE_NAME[m]);
      }
      dk_free(&P);
    }
}
