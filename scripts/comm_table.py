#!/usr/bin/env python3
"""Bytes communicated per row by a vocabulary-parallel LM head + cross-entropy: fusedhead against
Cut Cross-Entropy, Megatron-LM and Liger-Kernel. fusedhead's numbers come from the buffer widths in
include/fusedhead_shard.h; the anchors' from the collectives their code issues (cited per row).

  python3 scripts/comm_table.py               print the table
  python3 scripts/comm_table.py --check FILE  exit 1 unless FILE holds the table between the
                                              comm-table markers (the test command runs this)
  python3 scripts/comm_table.py --write FILE  replace the table in FILE

Model: per row of the batch, the payload of each collective (what one rank contributes), and the
bytes one rank sends with the ring algorithms NCCL and gloo use: an all-reduce of S bytes sends
2(P-1)/P·S, an all-gather of S bytes per rank sends (P-1)·S. Hidden size D, activations and dE in
bf16 unless the method fixes another dtype.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_block  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "include", "fusedhead_shard.h")
BEGIN, END = "<!-- comm-table:begin (scripts/comm_table.py) -->", "<!-- comm-table:end -->"
D = 4096
RANKS = (2, 8)
BF16, FP32, FP64 = 2, 4, 8


def header_widths(path=HEADER):
    """The per-row buffer widths (in doubles) the library defines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = {}
    for name in ("FH_SHARD_LCE_PARTIAL", "FH_SHARD_DISTILL_STATS", "FH_SHARD_DISTILL_DIV"):
        m = re.search(r"#define\s+%s\s+(\d+)" % name, text)
        if not m:
            raise SystemExit("comm_table: %s not found in %s" % (name, path))
        out[name] = int(m.group(1))
    m = re.search(r"#define\s+FH_SHARD_DECODE_WIDTH\(K\)\s+\((\d+)\s*\+\s*(\d+)\s*\*\s*\(K\)\)", text)
    if not m:
        raise SystemExit("comm_table: FH_SHARD_DECODE_WIDTH not found in %s" % path)
    out["decode"] = (int(m.group(1)), int(m.group(2)))
    return out


def methods(w):
    """(name, forward collectives [(kind, bytes per row)], backward collectives, source)."""
    part = w["FH_SHARD_LCE_PARTIAL"] * FP64
    return [
        ("fusedhead", [("all-gather", part)], [("all-reduce", BF16 * D)],
         "include/fusedhead_shard.h: partials (with the unmasked count and weight sum) gathered, merged in rank "
         "order, kept for the backward; dE in E's dtype"),
        ("Cut Cross-Entropy", [("all-reduce", FP32)] * 3, [("all-reduce", FP32 * D)],
         "cut_cross_entropy/vocab_parallel: max and sum of exp(lse - max), target logit; dE in fp32"),
        ("Megatron-LM", [("all-reduce", FP32)] * 3, [("all-reduce", BF16 * D)],
         "megatron/core/tensor_parallel/cross_entropy.py: max, target logit, sum exp; dE by the "
         "column-parallel head"),
        ("Megatron-LM (fused)", [("all-reduce", FP32), ("all-reduce", 2 * FP32)], [("all-reduce", BF16 * D)],
         "megatron/core/fusions/fused_cross_entropy.py: max, then [target logit; sum exp]"),
        ("Liger-Kernel", [("all-reduce", FP32)] * 3, [("all-reduce", BF16 * D)],
         "ops/vocab_parallel_cross_entropy.py: max, sum exp, target logit; dE by the head's linear"),
    ]


def sent(kind, nbytes, P):
    return 2.0 * (P - 1) / P * nbytes if kind == "all-reduce" else float((P - 1) * nbytes)


def table(w=None):
    w = w or header_widths()
    rows = ["| method | forward collectives | forward payload, B/row | backward collectives | "
            "backward payload, B/row | " + " | ".join("sent per rank, B/row, P=%d (fwd + bwd)" % P for P in RANKS) + " |",
            "|---|---|---|---|---|" + "---|" * len(RANKS)]
    for name, fwd, bwd, _ in methods(w):
        cells = [name, "%d (%s)" % (len(fwd), ", ".join(sorted(set(k for k, _ in fwd)))),
                 " + ".join(str(b) for _, b in fwd), "%d (%s)" % (len(bwd), bwd[0][0]),
                 " + ".join(str(b) for _, b in bwd)]
        for P in RANKS:
            f = sum(sent(k, b, P) for k, b in fwd)
            g = sum(sent(k, b, P) for k, b in bwd)
            cells.append("%.0f + %.0f" % (f, g))
        rows.append("| " + " | ".join(cells) + " |")
    k = 16
    dec = w["decode"][0] + w["decode"][1] * k
    rows.append("")
    rows.append("D = %d, bf16 activations. fusedhead distillation: 2 all-gathers forward (%d + %d B/row per "
                "rank), 1 all-reduce of dE backward; decoding: 1 all-gather of %d B/row per rank with K = %d "
                "candidates." % (D, w["FH_SHARD_DISTILL_STATS"] * FP64, w["FH_SHARD_DISTILL_DIV"] * FP64,
                                 dec * FP64, k))
    rows.append("Sources: " + "; ".join("%s: %s" % (n, src) for n, _, _, src in methods(w)) + ".")
    return "\n".join(rows)


def main(argv):
    return readme_block.main(argv, "comm_table", BEGIN, END, table(), __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
