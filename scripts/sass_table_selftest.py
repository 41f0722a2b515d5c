#!/usr/bin/env python3
"""sass_table_selftest.py: the self-test of sass_table.py (`scripts/sass_table.sh --self-test`):
its parser, loop detection, counting and rules on the canned SASS of scripts/testdata
(sass_selftest.sass, sass_selftest.res), no CUDA needed. Split from sass_table.py to keep each
file readable."""
import os

from sass_table import *  # noqa: F401,F403 (the functions under test)
import re


def self_test(datadir):
    with open(os.path.join(datadir, "sass_selftest.sass")) as f:
        sass = f.read()
    with open(os.path.join(datadir, "sass_selftest.res")) as f:
        res = f.read()
    texts = ["lce_fwd_tile_kernel", "topk_fused_tile_kernel"]
    texts90 = ["lce_fwd_tile_kernel", "lce_bwd_rows_kernel", "topk_fused_tile_kernel"]
    pats, pats90 = [re.compile(t) for t in texts], [re.compile(t) for t in texts90]
    # the default architectures (sm_80 sm_90a) and sm_90, whose cubin holds no vec16 kernel
    kernels, viol = run(sass, res, pats, texts, ["sm_80", "sm_90", "sm_90a"], pats90, texts90)
    fails = []

    def expect(what, got, want):
        if got != want:
            fails.append("%s: got %r, want %r" % (what, got, want))

    expect("kernels", [(k.arch, k.mangled[:20]) for k in kernels],
           [("sm_80", "_ZN6fh_lce19lce_fwd_"), ("sm_80", "_ZN6fh_lce19lce_fwd_"),
            ("sm_80", "_ZN6fh_lce19lce_fwd_"), ("sm_80", "_Z12spill_kernelv"),
            ("sm_80", "_ZN6fh_lce19lce_fwd_"), ("sm_90", "_ZN6fh_lce19lce_fwd_"),
            ("sm_90", "_ZN3cub11EmptyKernel"), ("sm_90a", "_ZN6fh_lce19lce_bwd_"),
            ("sm_90a", "_ZN6fh_lce19lce_fwd_"), ("sm_90a", "_ZN6fh_lce19lce_fwd_"),
            ("sm_90a", "_ZN6fh_lce19lce_fwd_"), ("sm_90a", "_ZN6fh_lce19lce_fwd_")])
    good, bad, wmma, spill, trap80, lab, lib, wg, tma, ser, ws, ws_bad = kernels
    # good: outer tile loop 0x0010-0x0160 holds the inner K loop 0x0040-0x00f0 and an epilogue
    # with a narrow load; the main loop is the inner one.
    expect("good demangled", short_name(good.name),
           "fh_lce::lce_fwd_tile_kernel<__nv_bfloat16, fh_eng::vec16>")
    expect("good class", good.cls, "vec16")
    expect("good loops", loops(good), [(0x10, 0x160), (0x40, 0xf0)])
    expect("good main loops", good.loops, [(0x40, 0xf0)])
    expect("good totals", [good.total[c] for c in ("HMMA", "LDSM", "LDGSTS", "LDG", "narrow_LDG",
                                                   "narrow_LD", "MUFU", "BAR", "STL", "LDL")],
           [2, 2, 2, 3, 2, 1, 1, 2, 0, 0])
    expect("good loop", [good.loop_total[c] for c in ("HMMA", "LDSM", "LDGSTS", "LDG",
                                                      "narrow_LDG", "BAR")], [2, 2, 2, 1, 0, 1])
    expect("good res", (good.res.get("REG"), good.res.get("SHARED"), good.res.get("STACK")),
           (128, 49152, 0))
    expect("good violations", good.violations, [])
    # bad: a loop with narrow loads (an 8-byte cp.async too), no LDSM; a BRA.DIV (forward).
    expect("bad class", bad.cls, "vec16")
    expect("bad main loops", bad.loops, [(0x20, 0x90)])
    expect("bad loop narrow", dict(bad.loop_narrow),
           {"LDG.E.U16": 2, "LDG.E.64.CONSTANT": 1, "LDGSTS.E.64": 1})
    expect("bad violations", bad.violations, ["narrow loads", "no LDSM"])
    # wmma (untagged, a gemm by pattern): the innermost HMMA loop 0x40-0x60 steps k over shared
    # memory (generic LD.E), the enclosing loop 0x10-0x80 stages the tile with LDG.E.U16: it is
    # the main loop.
    expect("wmma class", wmma.cls, "gemm")
    expect("wmma loops", loops(wmma), [(0x10, 0x80), (0x40, 0x60)])
    expect("wmma main loops", wmma.loops, [(0x10, 0x80)])
    expect("wmma loop narrow", dict(wmma.loop_narrow), {"LDG.E.U16": 1, "LD.E": 1})
    expect("wmma totals", (wmma.total["narrow_LDG"], wmma.loop_total["narrow_LDG"],
                           wmma.loop_total["BAR"]), (2, 1, 2))
    # spill: STL/LDL, the self-branch at the end is no loop.
    expect("spill loops", loops(spill), [])
    expect("spill counts", (spill.total["STL"], spill.total["LDL"]), (1, 2))
    expect("spill violations", spill.violations, ["spills"])
    # labelled branches (`(.L_x_1)`) on sm_90, scalar tag: a main loop is all it needs.
    expect("label class", lab.cls, "scalar")
    expect("label loops", lab.loops, [(0x10, 0x50)])
    expect("label violations", lab.violations, [])
    expect("library", (lib.library, lib.violations), (True, []))
    # sm_90a: TMA (UTMALDG) into HGMMA, which reads shared memory itself (no LDSM needed).
    expect("wgmma main loops", wg.loops, [(0x10, 0x50)])
    expect("wgmma counts", (wg.total["HGMMA"], wg.total["UTMALDG"]), (1, 1))
    expect("wgmma violations", wg.violations, [])
    expect("wgmma chain (single HGMMA)", wgmma_chain(wg, 0x10, 0x50), (1, 0))
    # tma90 on sm_80: compiled, but the wgmma wrappers are __trap(): no HGMMA, not a GEMM kernel
    # there (its loop has a narrow load and no tensor op), no violation.
    expect("tma90 sm_80 class", (short_name(trap80.name), trap80.cls),
           ("fh_lce::lce_fwd_tile_kernel<__nv_bfloat16, fh_eng::tma90>", ""))
    expect("tma90 sm_80 violations", trap80.violations, [])
    # tma90 on sm_90a, good: LDGSTS + UTMALDG and a chain of 4 HGMMA with gsb0 on the last one in
    # the K loop 0x40-0x100; the mbarrier retry 0x150-0x160 behind the EXIT branches back into the
    # loop (BRA 0xa0): no loop. The epilogue's narrow load (0x120) is outside the main loop.
    expect("tma90 class", (short_name(tma.name), tma.cls),
           ("fh_lce::lce_fwd_tile_kernel<__nv_bfloat16, fh_eng::tma90>", "tma90"))
    expect("tma90 loops", loops(tma), [(0x40, 0x100), (0x150, 0x160)])
    expect("tma90 main loops", tma.loops, [(0x40, 0x100)])
    expect("tma90 operands", [o for a, op, o in tma.instrs if a in (0xb0, 0xe0)],
           ["R24, gdesc[UR8], R24, UP0", "R24, gdesc[UR8], R24, gsb0"])
    expect("tma90 predicates", (tma.preds.get(0x90), tma.preds.get(0x170)), ("@!P0", None))
    expect("tma90 chain", wgmma_chain(tma, 0x40, 0x100), (4, 1))
    expect("tma90 loop", [tma.loop_total[c] for c in ("HGMMA", "LDGSTS", "UTMALDG", "narrow_LDG")],
           [4, 1, 1, 0])
    expect("tma90 res", (tma.res.get("REG"), tma.res.get("SHARED")), (168, 1024))
    expect("tma90 violations", tma.violations, [])
    # tma90 on sm_90a, serialized by ptxas: gsb0 on every HGMMA, WARPGROUP.DEPBAR.LE gsb0, 0x0
    # between them; a predicated EXIT inside the loop does not break it.
    expect("serialized class", ser.cls, "tma90")
    expect("serialized main loops", ser.loops, [(0x20, 0x110)])
    expect("serialized chain", wgmma_chain(ser, 0x20, 0x110), (4, 4))
    expect("serialized violations", ser.violations, ["wgmma serialized"])
    # tma90ws: the producer's loop 0x30-0x70 (TMA and cp.async, no HGMMA) is no main loop; the
    # consumers' HGMMA loop 0x90-0x110 is, with no load of its own. Without a producer loop: a
    # violation.
    expect("tma90ws class", (short_name(ws.name), ws.cls),
           ("fh_lce::lce_fwd_tile_kernel<__nv_bfloat16, fh_eng::tma90ws>", "tma90ws"))
    expect("tma90ws loops", loops(ws), [(0x30, 0x70), (0x90, 0x110)])
    expect("tma90ws main loops", ws.loops, [(0x90, 0x110)])
    expect("tma90ws producer loops", producer_loops(ws), [(0x30, 0x70)])
    expect("tma90ws chain", wgmma_chain(ws, 0x90, 0x110), (4, 1))
    expect("tma90ws res", ws.res.get("REG"), 200)
    expect("tma90ws violations", ws.violations, [])
    expect("tma90ws without producer", (ws_bad.cls, ws_bad.violations), ("tma90ws", ["no producer loop"]))
    summ = "\n".join(summary(kernels, viol))
    for want in ("sass: sm_80: 5 kernels (0 library), 3 GEMM (2 vec16, 0 tma90, 0 tma90ws, 0 scalar, "
                 "1 untagged by pattern), 1 with spills, 2 GEMM kernels violating rule (b)",
                 "sass: sm_90a: 5 kernels (0 library), 5 GEMM (1 vec16, 2 tma90, 2 tma90ws, 0 scalar, "
                 "0 untagged by pattern), 0 with spills, 2 GEMM kernels violating rule (b)"):
        if want not in summ:
            fails.append("missing summary %r in:\n%s" % (want, summ))
    rules = sorted(set(r for r, _ in viol))
    expect("rules", rules, ["a", "b"])
    msgs = "\n".join(m for _, m in viol)
    for want in ("sm_80 spill_kernel: local memory traffic (spills, or a local array): 1 STL, 2 LDL",
                 "main loop 0x0020-0x0090: narrow global loads (LDG.E.64.CONSTANT x1, LDG.E.U16 x2, "
                 "LDGSTS.E.64 x1); no LDSM (ldmatrix)",
                 "sm_80 fh_lce::lce_fwd_tile_kernel<float>: main loop 0x0010-0x0080: narrow global "
                 "loads (LD.E x1, LDG.E.U16 x1); no LDGSTS (cp.async); no LDSM (ldmatrix)",
                 "sm_80: no kernel matches the expected GEMM pattern 'topk_fused_tile_kernel'",
                 "sm_90: no kernel matching 'lce_fwd_tile_kernel' is an fh_eng::vec16 instantiation",
                 "sm_90a fh_lce::lce_fwd_tile_kernel<__half, fh_eng::tma90>: main loop 0x0020-0x0110: "
                 "wgmma chain serialized (gsb0 on all 4 HGMMA: ptxas C7514/C7520)",
                 "sm_90a: no kernel matching 'lce_fwd_tile_kernel' is an fh_eng::vec16 instantiation "
                 "(found: fh_lce::lce_fwd_tile_kernel<__nv_bfloat16, fh_eng::tma90>, "
                 "fh_lce::lce_fwd_tile_kernel<__half, fh_eng::tma90>, "
                 "fh_lce::lce_fwd_tile_kernel<__nv_bfloat16, fh_eng::tma90ws>, "
                 "fh_lce::lce_fwd_tile_kernel<__half, fh_eng::tma90ws>)",
                 "sm_90a fh_lce::lce_fwd_tile_kernel<__half, fh_eng::tma90ws>: no producer loop (UTMALDG "
                 "and LDGSTS, no HGMMA)",
                 "sm_90a: no fh_eng::tma90 or tma90ws kernel matches the expected wgmma GEMM pattern "
                 "'lce_bwd_rows_kernel' (gemm_kernels_sm90.txt; found: "
                 "fh_lce::lce_bwd_rows_kernel<__nv_bfloat16, fh_eng::vec16>)",
                 "sm_90a: no fh_eng::tma90 or tma90ws kernel matches the expected wgmma GEMM pattern "
                 "'topk_fused_tile_kernel' (gemm_kernels_sm90.txt; found: none)"):
        if want not in msgs:
            fails.append("missing message %r in:\n%s" % (want, msgs))
    if any("sm_90: no kernel matches the expected GEMM pattern 'lce_fwd" in m for _, m in viol):
        fails.append("lce_fwd_tile_kernel exists on sm_90")
    if any("'lce_fwd_tile_kernel' (gemm_kernels_sm90.txt" in m or "sm_80 fh_lce::lce_fwd_tile_kernel"
           "<__nv_bfloat16, fh_eng::tma90>" in m or "fh_eng::tma90>: main loop 0x0040" in m
           for _, m in viol):
        fails.append("a tma90 kernel that passes (sm_90a) or is not checked (sm_80) is reported:\n%s"
                     % "\n".join(m for _, m in viol))
    # sm_90a not among the checked architectures: gemm_kernels_sm90.txt is not checked; a library
    # without an sm_90a cubin when it is: reported.
    _, v2 = run(sass, res, pats, texts, ["sm_80", "sm_90"], pats90, texts90)
    expect("sm90 patterns unchecked", [m for _, m in v2 if "gemm_kernels_sm90" in m], [])
    no90a = sass[:sass.index("arch = sm_90a")]
    _, v3 = run(no90a, res, pats, texts, ["sm_80", "sm_90a"], pats90, texts90)
    expect("no sm_90a cubin", [m for _, m in v3 if "sm_90a" in m],
           ["no sm_90a cubin in the library: the tma90 kernels of gemm_kernels_sm90.txt cannot be "
            "checked"])
    widths = [load_width(o) for o in ("LDG.E", "LDG.E.U8", "LDG.E.S16", "LDG.E.64",
                                      "LDG.E.128.CONSTANT", "LDG.E.LTC128B", "LD.E.U16")]
    expect("widths", widths, [32, 8, 16, 64, 128, 32, 16])
    md = markdown(kernels)
    expect("markdown rows", md.count("\n"), 2 + len(kernels))
    for f in fails:
        print("sass_table self-test: FAIL: " + f)
    if fails:
        print("sass_table self-test: FAILED (%d checks failed)" % len(fails))
        return 1
    print("sass_table self-test: OK (parser, loop detection, counting, rules, tma90/wgmma)")
    return 0


