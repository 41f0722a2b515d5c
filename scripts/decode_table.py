#!/usr/bin/env python3
"""Cost model of fused decoding on CUDA (kernels/decode_fused.cu; docs/decoding.md, "Fused
decoding on CUDA"): bytes, tensor-core work and projected time per call against the HBM floor of
one pass over the classifier C, at the issue's LLM shapes. A PROJECTION with the rates below, not
a measurement: no GPU has run this kernel.

  python3 scripts/decode_table.py               print the table
  python3 scripts/decode_table.py --check FILE  exit 1 unless FILE holds the table between the
                                                decode-table markers (the test command runs this)
  python3 scripts/decode_table.py --write FILE  replace the table in FILE

Model, per call, every row decided by the certificate (no fallback pass; a fallback re-streams C
once more for each row block holding a flagged row, see the suite's counts):
  - splits and row blocks as the kernel computes them (NC, MAX_SPLITS and the 128 x 128 tile are
    read from the sources); CTAs = splits x row blocks, one per SM (the tile kernel's shared
    memory); waves on the GPU's SMs, and the last wave's idle SMs as a bandwidth loss;
  - HBM: C once per row block (V·D·2 bytes, bf16), counted by the emulator in kernel_decode_fused;
    the per-(row, split) state written and read back (112 + NC·24 bytes), and CUB's segmented
    radix sort of the B·splits·NC candidates modelled as 11 passes (64-bit keys, 6-bit digits)
    reading and writing 12 bytes per item;
  - L2 -> SM: every 128-id tile also loads its row block of H (rows·D·2 bytes);
  - tensor cores: the full 128 x 128 tile, 2·128·V·D per row block (small B pads N to 128),
    at an assumed 60% of the dense bf16 peak;
  - projected ms = max(HBM / (bandwidth · wave efficiency), mma, L2); the epilogue (fp64 per
    logit, one warp per row) is not overlapped with the loads in this version and is not
    modelled: the time is a lower bound of this design.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_block  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- decode-table:begin (scripts/decode_table.py) -->", "<!-- decode-table:end -->"
GPUS = (("H100-SXM", 132, 3.35e12, 989e12 * 0.60, 7.5e12), ("H200", 132, 4.8e12, 989e12 * 0.60, 7.5e12))
SHAPES = [(128256, 4096, b) for b in (1, 16, 64, 256)] + [(256000, 2304, b) for b in (1, 16, 64, 256)] + \
         [(128256, 8192, 16)]
STAT_BYTES, SORT_PASSES, BF16 = 112, 11, 2


def constants():
    with open(os.path.join(ROOT, "kernels", "decode_fused.cu"), encoding="utf-8") as f:
        src = f.read()
    nc = int(re.search(r"constexpr int NC = (\d+);", src).group(1))
    ms = int(re.search(r"constexpr int MAX_SPLITS = (\d+);", src).group(1))
    with open(os.path.join(ROOT, "kernels", "engine", "sm80.cuh"), encoding="utf-8") as f:
        m = re.search(r"constexpr int BM = (\d+), BN = (\d+);", f.read())
    return nc, ms, int(m.group(1)), int(m.group(2))


def model(V, D, B, gpu):
    nc, max_splits, bm, bn = constants()
    name, sms, hbm, mma, l2 = gpu
    tiles = -(-V // bm)
    per = -(-tiles // max_splits)
    splits = -(-tiles // per)
    blocks = -(-B // bn)
    ctas = splits * blocks
    waves = -(-ctas // sms)
    eff = ctas / (waves * sms)
    c_bytes = blocks * V * D * BF16
    items = B * splits * nc
    aux = 2 * B * splits * (STAT_BYTES + nc * 24) + SORT_PASSES * 2 * 12 * items
    l2_bytes = tiles * B * D * BF16 + c_bytes
    flops = 2.0 * bn * V * D * blocks
    t_hbm = (c_bytes + aux) / (hbm * eff)
    t = max(t_hbm, flops / mma, l2_bytes / l2)
    floor = V * D * BF16 / hbm
    return dict(splits=splits, ctas=ctas, waves=waves, eff=eff, c=c_bytes, aux=aux, flops=flops,
                t=t * 1e3, floor=floor * 1e3, bound="HBM" if t == t_hbm else ("mma" if t == flops / mma else "L2"))


def table():
    rows = ["| V | D | B | splits x row blocks (waves on 132 SMs) | C from HBM | state + sort | mma GFLOP | "
            "H100: floor / projected ms | H200: floor / projected ms |",
            "|---:|---:|---:|---|---:|---:|---:|---|---|"]
    for V, D, B in SHAPES:
        h1, h2 = model(V, D, B, GPUS[0]), model(V, D, B, GPUS[1])
        rows.append("| %d | %d | %d | %d x %d = %d (%d, %.0f%% busy) | %.2f GB | %.1f MB | %.0f | %.3f / %.3f (%s) | "
                    "%.3f / %.3f |" % (V, D, B, h1["splits"], h1["ctas"] // h1["splits"], h1["ctas"], h1["waves"],
                                       100 * h1["eff"], h1["c"] / 1e9, h1["aux"] / 1e6, h1["flops"] / 1e9,
                                       h1["floor"], h1["t"], h1["bound"], h2["floor"], h2["t"]))
    return "\n".join(rows)


def main(argv):
    return readme_block.main(argv, "decode_table", BEGIN, END, table(), __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
