#!/usr/bin/env python3
"""sass_table.py: static evidence from the SASS of fusedhead's cubins (docs/sass.md).

Reads the output of `cuobjdump -sass` and `cuobjdump -res-usage` on the library, and writes,
per kernel and architecture, instruction counts (HMMA, LDSM, LDGSTS, LDG, narrow loads, MUFU,
BAR, ...) over the whole kernel and over its main loop(s), with the resource usage of ptxas
(registers, static shared memory, stack, local memory). Then applies the rules of docs/engine.md
("Evidence"), exiting 1 when one is broken:
  (a) no kernel of ours has local-memory stores or loads (STL/LDL: register spills);
  (b) every GEMM kernel's main loop is fed by 16-byte async copies and ldmatrix into tensor-core
      instructions, with no narrow global load; every tma90 (wgmma) kernel's main loop holds
      HGMMA and TMA/cp.async copies, no narrow global load, and a wgmma chain that is not
      serialized (gsb0 on every HGMMA); every expected GEMM kernel exists.
It is called by scripts/sass_table.sh, which finds or installs cuobjdump; `--self-test` checks the
parser on scripts/testdata/sass_selftest.sass.

Main loop (static heuristic): a backward branch (BRA to a strictly lower address) closes a loop
whose body is [target, branch]; branches to the same target are one loop. For each innermost loop
that holds a tensor-core instruction (HMMA, or HGMMA on sm_90a), the main loop is that loop if it
also holds a global load (LDG, LDGSTS, UTMALDG/UBLKCP), else the nearest enclosing loop that does
(a k-step loop over shared memory is not the K loop), else the innermost loop itself. An outer
loop over vocabulary tiles, which holds the epilogue too, is therefore not taken.
"""
import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict, defaultdict

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
LABEL_RE = re.compile(r"^\s*(\.L[\w.]*):\s*$")
FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
ARCH_RE = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
PRED_RE = re.compile(r"^@!?U?P[T0-9]+\s+")
HEX_RE = re.compile(r"0x([0-9a-fA-F]+)")
LABEL_REF_RE = re.compile(r"`\(([^)]+)\)")


class Kernel:
    def __init__(self, arch, mangled):
        self.arch = arch
        self.mangled = mangled
        self.name = mangled          # demangled later
        self.instrs = []             # (address, opcode, operands): operands as printed, up to ';'
        self.preds = {}              # address -> guard predicate ("@!P0") of predicated instructions
        self.labels = {}             # label -> address of the next instruction
        self.pending_labels = []
        self.res = {}                # REG, STACK, SHARED, LOCAL from -res-usage


def parse_sass(text):
    """Kernels of `cuobjdump -sass` output, in order, each with its architecture."""
    kernels = []
    arch = "sm_unknown"
    cur = None
    for line in text.splitlines():
        m = ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            cur = None
            continue
        m = FUNC_RE.match(line)
        if m:
            cur = Kernel(arch, m.group(1))
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = LABEL_RE.match(line)
        if m:
            cur.pending_labels.append(m.group(1))
            continue
        m = INSTR_RE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(2).strip()
        pm = PRED_RE.match(body)
        if pm:
            cur.preds[addr] = pm.group(0).strip()
            body = body[pm.end():]
        parts = body.split(None, 1)
        if not parts:
            continue
        opcode = parts[0]
        operands = parts[1] if len(parts) > 1 else ""
        for lab in cur.pending_labels:
            cur.labels[lab] = addr
        cur.pending_labels = []
        cur.instrs.append((addr, opcode, operands))
    return kernels


def parse_res_usage(text):
    """{(arch, mangled): [dict, ...]} from `cuobjdump -res-usage` (a list: names may repeat)."""
    out = defaultdict(list)
    arch = "sm_unknown"
    name = None
    for line in text.splitlines():
        m = ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"^\s*Function\s+(\S+?):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            vals = dict((k, int(v)) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[(arch, name)].append(vals)
            name = None
    return out


def demangle(names):
    """Demangled names (c++filt, or cu++filt), the mangled ones when neither is installed."""
    names = list(names)
    for tool in ("cu++filt", "c++filt"):
        exe = shutil.which(tool)
        if not exe or not names:
            continue
        try:
            r = subprocess.run([exe], input="\n".join(names) + "\n", capture_output=True, text=True,
                               check=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        lines = r.stdout.splitlines()
        if len(lines) == len(names):
            return lines
    return names


# ---------------------------------------------------------------------------------------------
# Classification of instructions
# ---------------------------------------------------------------------------------------------

def base(opcode):
    return opcode.split(".", 1)[0]


def load_width(opcode):
    """Width in bits of an LDG / LD from its modifiers: U8/S8 8, U16/S16 16, 64, 128 (256 too),
    none of these: 32 (LDG.E, LDG.E.CONSTANT, LDG.E.EF ...)."""
    mods = opcode.split(".")[1:]
    if "128" in mods or "256" in mods:
        return 128
    if "64" in mods:
        return 64
    if "U16" in mods or "S16" in mods:
        return 16
    if "U8" in mods or "S8" in mods:
        return 8
    return 32


COUNTERS = OrderedDict([
    # column: predicate on (base opcode, full opcode)
    ("HMMA", lambda b, o: b == "HMMA"),
    ("HGMMA", lambda b, o: b == "HGMMA"),
    ("LDSM", lambda b, o: b == "LDSM"),
    ("LDGSTS", lambda b, o: b == "LDGSTS"),
    ("UTMALDG", lambda b, o: b in ("UTMALDG", "UBLKCP")),
    ("LDG", lambda b, o: b == "LDG"),
    ("narrow_LDG", lambda b, o: b == "LDG" and load_width(o) < 128),
    ("narrow_LD", lambda b, o: b == "LD" and load_width(o) < 128),
    ("narrow_LDGSTS", lambda b, o: b == "LDGSTS" and load_width(o) < 128),
    ("MUFU", lambda b, o: b == "MUFU"),
    ("BAR", lambda b, o: b == "BAR"),
    ("STL", lambda b, o: b == "STL"),
    ("LDL", lambda b, o: b == "LDL"),
])
TENSOR_OPS = ("HMMA", "HGMMA")
NARROW_CHECKED = ("LDG", "LD", "LDGSTS")  # a narrow one: width < 128 bits (load_width)


def count(instrs, lo=None, hi=None):
    c = OrderedDict((k, 0) for k in COUNTERS)
    narrow = defaultdict(int)
    for addr, op, _ in instrs:
        if lo is not None and not (lo <= addr <= hi):
            continue
        b = base(op)
        for k, pred in COUNTERS.items():
            if pred(b, op):
                c[k] += 1
        if b in NARROW_CHECKED and load_width(op) < 128:
            narrow[op] += 1
    return c, dict(narrow)


def branch_target(k, opcode, operands):
    """Target address of a branch instruction (BRA, BRA.DIV, BRA.U, JMP ...), else None."""
    if base(opcode) not in ("BRA", "JMP"):
        return None
    m = LABEL_REF_RE.search(operands)
    if m:
        return k.labels.get(m.group(1))
    hexes = HEX_RE.findall(operands)
    return int(hexes[-1], 16) if hexes else None


def loops(k):
    """[(target, last_branch)] of the backward branches, one range per target. A backward branch
    with an unpredicated EXIT between its target and itself is no loop: it returns from a block
    that ptxas moved out of line behind the EXIT (the retry of an mbarrier try_wait, BRA back
    into the K loop) and is entered only by a forward branch."""
    exits = [a for a, op, _ in k.instrs if base(op) == "EXIT" and a not in k.preds]
    by_target = {}
    for addr, op, operands in k.instrs:
        t = branch_target(k, op, operands)
        if t is not None and t < addr and not any(t <= e < addr for e in exits):
            by_target[t] = max(by_target.get(t, addr), addr)
    return sorted(by_target.items())


GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


def main_loops(k):
    """The K loops: for each innermost loop holding a tensor-core instruction, that loop if it
    also holds a global load (LDG, LDGSTS, UTMALDG/UBLKCP), else the nearest enclosing loop that
    does (the innermost one may step k over shared memory only), else the innermost loop. An
    HGMMA loop is taken as it is (a warp-specialized consumer: a producer warp loads)."""
    tc_addrs = [a for a, op, _ in k.instrs if base(op) in TENSOR_OPS]
    hgmma = [a for a, op, _ in k.instrs if base(op) == "HGMMA"]
    ld_addrs = [a for a, op, _ in k.instrs if base(op) in GLOBAL_LOADS]
    every = loops(k)
    tc = [(t, b) for t, b in every if any(t <= a <= b for a in tc_addrs)]
    out = []
    for t, b in tc:
        if any((t2, b2) != (t, b) and t <= t2 and b2 <= b for t2, b2 in tc):
            continue  # not innermost
        outer = sorted(((t2, b2) for t2, b2 in every if t2 <= t and b <= b2),
                       key=lambda r: (r[1] - r[0], -r[0]))  # itself first, then enclosing ones
        pick = (t, b)
        if not any(t <= a <= b for a in hgmma):  # wgmma consumers: the producer loads elsewhere
            pick = next((r for r in outer if any(r[0] <= a <= r[1] for a in ld_addrs)), (t, b))
        if pick not in out:
            out.append(pick)
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Analysis and rules
# ---------------------------------------------------------------------------------------------

def is_library(k):
    return bool(re.match(r"^_ZN(3cub|6thrust)", k.mangled)) or bool(
        re.match(r"^(void )?(cub|thrust)::", k.name))


def gemm_class(k, patterns):
    """vec16 / tma90 / tma90ws / scalar (engine tags), gemm (matched by a pattern of
    gemm_kernels.txt, untagged), ''. tma90 and tma90ws (the wgmma mainloops, the second
    warp-specialized) are GEMM kernels on sm_90a only: on other architectures their wgmma wrappers
    are __trap() (no HGMMA), and they are not checked ('')."""
    if "fh_eng::tma90ws" in k.name or "6fh_eng7tma90ws" in k.mangled:
        return "tma90ws" if k.arch == "sm_90a" else ""
    if "fh_eng::tma90" in k.name or "6fh_eng5tma90" in k.mangled:
        return "tma90" if k.arch == "sm_90a" else ""
    if "fh_eng::vec16" in k.name or "6fh_eng5vec16" in k.mangled:
        return "vec16"
    if "fh_eng::scalar" in k.name or "6fh_eng6scalar" in k.mangled:
        return "scalar"
    if any(p.search(k.name) for p in patterns):
        return "gemm"
    return ""


def short_name(name):
    """The demangled name without the return type and the parameter list."""
    s = name.strip()
    if s.startswith("void "):
        s = s[5:]
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ")":
                depth += 1
            elif s[i] == "(":
                depth -= 1
                if depth == 0:
                    s = s[:i]
                    break
    return s


def analyze(kernels, res, patterns):
    used = defaultdict(int)
    names = demangle([k.mangled for k in kernels])
    for k, n in zip(kernels, names):
        k.name = n
        lst = res.get((k.arch, k.mangled), [])
        i = used[(k.arch, k.mangled)]
        k.res = lst[i] if i < len(lst) else {}
        used[(k.arch, k.mangled)] += 1
        k.total, k.total_narrow = count(k.instrs)
        k.loops = main_loops(k)
        k.loop_counts = []
        for t, b in k.loops:
            k.loop_counts.append(count(k.instrs, t, b))
        inside = [ins for ins in k.instrs if any(t <= ins[0] <= b for t, b in k.loops)]
        k.loop_total, k.loop_narrow = count(inside)  # over the union (main loops may nest)
        k.library = is_library(k)
        k.cls = gemm_class(k, patterns)
        k.violations = []


GSB0_RE = re.compile(r"\bgsb0\b")


def wgmma_chain(k, lo, hi):
    """(HGMMA, HGMMA carrying the gsb0 scoreboard operand) in [lo, hi]. ptxas puts gsb0 on the
    last HGMMA of a chain; when it serializes the chain (warnings C7514/C7520) every HGMMA has
    it, each followed by WARPGROUP.DEPBAR.LE gsb0, 0x0."""
    n = g = 0
    for addr, op, operands in k.instrs:
        if lo <= addr <= hi and base(op) == "HGMMA":
            n += 1
            g += bool(GSB0_RE.search(operands))
    return n, g


def fmt_narrow(d):
    return ", ".join("%s x%d" % (op, n) for op, n in sorted(d.items()))


def tag(k, what):
    if what not in k.violations:
        k.violations.append(what)


def check(kernels, patterns, pattern_texts, gemm_archs, patterns90=(), pattern90_texts=()):
    """Rule violations: list of (rule, message). (a) spills; (b) GEMM main loops; (b') expected:
    patterns (gemm_kernels.txt) match a vec16 kernel on each cubin of gemm_archs, patterns90
    (gemm_kernels_sm90.txt) a tma90 or tma90ws kernel on the sm_90a cubin (when sm_90a is in
    gemm_archs)."""
    v = []
    for k in kernels:
        where = "%s %s" % (k.arch, short_name(k.name))
        if not k.library and (k.total["STL"] or k.total["LDL"]):
            msg = "%s: local memory traffic (spills, or a local array): %d STL, %d LDL (stack %s B)" % (
                where, k.total["STL"], k.total["LDL"], k.res.get("STACK", "?"))
            tag(k, "spills")
            v.append(("a", msg))
        if not k.cls:
            continue
        if not k.loops:
            tag(k, "no HMMA loop")
            v.append(("b", "%s: no main loop with tensor-core instructions (HMMA/HGMMA)" % where))
            continue
        if k.cls == "scalar":
            continue
        if k.cls == "tma90":
            check_tma90(k, where, v)
            continue
        if k.cls == "tma90ws":
            check_tma90ws(k, where, v)
            continue
        for (t, b), (c, nar) in zip(k.loops, k.loop_counts):
            bad = []
            if c["narrow_LDG"] or c["narrow_LD"] or c["narrow_LDGSTS"]:
                bad.append("narrow global loads (%s)" % fmt_narrow(nar))
                tag(k, "narrow loads")
            tma_anywhere = c["HGMMA"] and (k.total["UTMALDG"] or k.total["LDGSTS"])
            if not (c["LDGSTS"] or c["UTMALDG"] or tma_anywhere):
                bad.append("no LDGSTS (cp.async)")
                tag(k, "no LDGSTS")
            if not c["LDSM"] and not c["HGMMA"]:
                bad.append("no LDSM (ldmatrix)")
                tag(k, "no LDSM")
            if bad:
                v.append(("b", "%s: main loop 0x%04x-0x%04x: %s" % (where, t, b, "; ".join(bad))))
    v.sort()
    present = sorted(set(k.arch for k in kernels))
    checked = [a for a in present if a in gemm_archs]
    if not gemm_archs:
        return v  # FH_SASS_GEMM_ARCHS="": the expected kernels are not checked
    if patterns and not checked:
        v.append(("b", "no cubin for %s in the library: the GEMM kernels cannot be checked"
                  % "/".join(gemm_archs)))
    for p, text in zip(patterns, pattern_texts):
        for arch in checked:
            m = [k for k in kernels if k.arch == arch and p.search(k.name)]
            if not m:
                v.append(("b", "%s: no kernel matches the expected GEMM pattern '%s'" % (arch, text)))
            elif not any(k.cls == "vec16" for k in m):
                v.append(("b", "%s: no kernel matching '%s' is an fh_eng::vec16 instantiation "
                          "(found: %s)" % (arch, text, ", ".join(short_name(k.name) for k in m))))
    if patterns90 and "sm_90a" in gemm_archs:
        if "sm_90a" not in present:
            v.append(("b", "no sm_90a cubin in the library: the tma90 kernels of "
                      "gemm_kernels_sm90.txt cannot be checked"))
        for p, text in zip(patterns90, pattern90_texts):
            if "sm_90a" not in present:
                break
            m = [k for k in kernels if k.arch == "sm_90a" and p.search(k.name)]
            if not any(k.cls in ("tma90", "tma90ws") for k in m):
                v.append(("b", "sm_90a: no fh_eng::tma90 or tma90ws kernel matches the expected wgmma GEMM "
                          "pattern '%s' (gemm_kernels_sm90.txt; found: %s)" % (
                              text, ", ".join(short_name(k.name) for k in m) or "none")))
    return v


def producer_loops(k):
    """The loops of a warp-specialized kernel's producer: UTMALDG and LDGSTS, no tensor op."""
    out = []
    for t, b in loops(k):
        ops = [base(op) for a, op, _ in k.instrs if t <= a <= b]
        if "UTMALDG" in ops and "LDGSTS" in ops and not any(o in TENSOR_OPS for o in ops):
            out.append((t, b))
    return out


def hgmma_loop_faults(k, t, b, c, nar):
    """What an HGMMA main loop [t, b] (counts c, narrow opcodes nar) must not have, in either
    wgmma class: narrow global loads, a serialized wgmma chain. Tags the kernel."""
    bad = []
    if c["narrow_LDG"] or c["narrow_LD"] or c["narrow_LDGSTS"]:
        bad.append("narrow global loads (%s)" % fmt_narrow(nar))
        tag(k, "narrow loads")
    n, g = wgmma_chain(k, t, b)
    if n > 1 and g == n:
        bad.append("wgmma chain serialized (gsb0 on all %d HGMMA: ptxas C7514/C7520)" % n)
        tag(k, "wgmma serialized")
    return bad


def stream_loop_faults(k, c, nar):
    """What a wgmma kernel's main loop without HGMMA (the backward's streamed gradient GEMMs, which
    stay on mma.sync) must have: the vec16 rule, HMMA fed by LDGSTS and LDSM, no narrow global
    load. Tags the kernel."""
    bad = []
    if not c["HMMA"]:
        bad.append("no HGMMA (wgmma) or HMMA")
        tag(k, "no HGMMA")
    if not c["LDGSTS"]:
        bad.append("no LDGSTS (cp.async)")
        tag(k, "no LDGSTS")
    if not c["LDSM"]:
        bad.append("no LDSM (ldmatrix)")
        tag(k, "no LDSM")
    if c["narrow_LDG"] or c["narrow_LD"] or c["narrow_LDGSTS"]:
        bad.append("narrow global loads (%s)" % fmt_narrow(nar))
        tag(k, "narrow loads")
    return bad


def check_tma90ws(k, where, v):
    """Rule (b) for a tma90ws kernel on sm_90a: its consumers' HGMMA loop(s) have no narrow
    global load and an unserialized wgmma chain (their loads are the producer's), their other
    main loops (the backward's streamed GEMMs) the vec16 rule, and the kernel has a producer loop
    issuing both the TMA (UTMALDG) and cp.async (LDGSTS)."""
    if not any(c["HGMMA"] for c, _ in k.loop_counts):
        v.append(("b", "%s: no main loop with HGMMA (wgmma)" % where))
        tag(k, "no HGMMA")
    for (t, b), (c, nar) in zip(k.loops, k.loop_counts):
        bad = hgmma_loop_faults(k, t, b, c, nar) if c["HGMMA"] else stream_loop_faults(k, c, nar)
        if bad:
            v.append(("b", "%s: main loop 0x%04x-0x%04x: %s" % (where, t, b, "; ".join(bad))))
    if not producer_loops(k):
        v.append(("b", "%s: no producer loop (UTMALDG and LDGSTS, no HGMMA)" % where))
        tag(k, "no producer loop")


def check_tma90(k, where, v):
    """Rule (b) for a tma90 kernel on sm_90a, per main loop: HGMMA, a global load (UTMALDG or
    LDGSTS), no narrow global load, and a wgmma chain that is not serialized. The kernel must
    have at least one HGMMA main loop; its other main loops (the backward's streamed gradient
    GEMMs, which stay on mma.sync) are held to the vec16 rule: LDGSTS, LDSM and HMMA."""
    if not any(c["HGMMA"] for c, _ in k.loop_counts):
        v.append(("b", "%s: no main loop with HGMMA (wgmma)" % where))
        tag(k, "no HGMMA")
    for (t, b), (c, nar) in zip(k.loops, k.loop_counts):
        bad = []
        if not c["HGMMA"]:
            bad = stream_loop_faults(k, c, nar)
            if bad:
                v.append(("b", "%s: main loop 0x%04x-0x%04x: %s" % (where, t, b, "; ".join(bad))))
            continue
        if not (c["UTMALDG"] or c["LDGSTS"]):
            bad.append("no UTMALDG (TMA) or LDGSTS (cp.async)")
            tag(k, "no TMA/LDGSTS")
        bad += hgmma_loop_faults(k, t, b, c, nar)
        if bad:
            v.append(("b", "%s: main loop 0x%04x-0x%04x: %s" % (where, t, b, "; ".join(bad))))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

COLUMNS = [
    ("arch", lambda k: k.arch),
    ("kernel", lambda k: short_name(k.name) + (" (library)" if k.library else "")),
    ("class", lambda k: k.cls or "-"),
    ("regs", lambda k: k.res.get("REG", "?")),
    ("smem_static_B", lambda k: k.res.get("SHARED", "?")),
    ("stack_B", lambda k: k.res.get("STACK", "?")),
    ("local_B", lambda k: k.res.get("LOCAL", "?")),
    ("STL", lambda k: k.total["STL"]),
    ("LDL", lambda k: k.total["LDL"]),
    ("HMMA", lambda k: k.total["HMMA"]),
    ("HGMMA", lambda k: k.total["HGMMA"]),
    ("LDSM", lambda k: k.total["LDSM"]),
    ("LDGSTS", lambda k: k.total["LDGSTS"]),
    ("UTMALDG", lambda k: k.total["UTMALDG"]),
    ("LDG", lambda k: k.total["LDG"]),
    ("narrow_LDG", lambda k: k.total["narrow_LDG"]),
    ("narrow_LD", lambda k: k.total["narrow_LD"]),
    ("narrow_LDGSTS", lambda k: k.total["narrow_LDGSTS"]),
    ("MUFU", lambda k: k.total["MUFU"]),
    ("BAR", lambda k: k.total["BAR"]),
    ("main_loops", lambda k: " ".join("0x%04x-0x%04x" % r for r in k.loops) or "-"),
    ("loop_HMMA", lambda k: k.loop_total["HMMA"] + k.loop_total["HGMMA"]),
    ("loop_LDSM", lambda k: k.loop_total["LDSM"]),
    ("loop_LDGSTS", lambda k: k.loop_total["LDGSTS"] + k.loop_total["UTMALDG"]),
    ("loop_LDG", lambda k: k.loop_total["LDG"]),
    ("loop_narrow", lambda k: k.loop_total["narrow_LDG"] + k.loop_total["narrow_LD"] +
     k.loop_total["narrow_LDGSTS"]),
    ("verdict", lambda k: ("FAIL: " + ", ".join(k.violations)) if k.violations
     else ("ok" if (k.cls or not k.library) else "-")),
]
MD_HEAD = {"smem_static_B": "smem (B)", "stack_B": "stack (B)", "local_B": "local (B)",
           "narrow_LDG": "narrow LDG", "narrow_LD": "narrow LD", "narrow_LDGSTS": "narrow LDGSTS", "main_loops": "main loops",
           "loop_HMMA": "loop HMMA", "loop_LDSM": "loop LDSM", "loop_LDGSTS": "loop LDGSTS",
           "loop_LDG": "loop LDG", "loop_narrow": "loop narrow"}


def rows(kernels):
    order = sorted(kernels, key=lambda k: (k.arch, k.library, not k.cls, short_name(k.name)))
    return [[str(f(k)) for _, f in COLUMNS] for k in order], order


def markdown(kernels):
    body, _ = rows(kernels)
    out = io.StringIO()
    out.write("| " + " | ".join(MD_HEAD.get(c, c) for c, _ in COLUMNS) + " |\n")
    out.write("|" + "|".join("---" if c in ("arch", "kernel", "class", "main_loops", "verdict")
                             else "---:" for c, _ in COLUMNS) + "|\n")
    for r in body:
        r = list(r)
        r[1] = "`%s`" % r[1].replace("|", "\\|")
        out.write("| " + " | ".join(r) + " |\n")
    return out.getvalue()


def write_csv(kernels, path):
    body, order = rows(kernels)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS] + ["loop_narrow_ops", "mangled"])
        for r, k in zip(body, order):
            w.writerow(r + [fmt_narrow(k.loop_narrow), k.mangled])


def summary(kernels, violations):
    lines = []
    for arch in sorted(set(k.arch for k in kernels)):
        ks = [k for k in kernels if k.arch == arch]
        g = [k for k in ks if k.cls]
        lines.append(
            "sass: %s: %d kernels (%d library), %d GEMM (%d vec16, %d tma90, %d tma90ws, %d scalar, "
            "%d untagged by pattern), %d with spills, %d GEMM kernels violating rule (b)" % (
                arch, len(ks), sum(k.library for k in ks), len(g),
                sum(k.cls == "vec16" for k in g), sum(k.cls == "tma90" for k in g),
                sum(k.cls == "tma90ws" for k in g),
                sum(k.cls == "scalar" for k in g),
                sum(k.cls == "gemm" for k in g), sum("spills" in k.violations for k in ks),
                sum(bool(set(k.violations) - {"spills"}) for k in g)))
    return lines


def load_patterns(path):
    texts = []
    if path:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    texts.append(line)
    return [re.compile(t) for t in texts], texts


def run(sass_text, res_text, patterns, pattern_texts, gemm_archs, patterns90=(), pattern90_texts=()):
    kernels = parse_sass(sass_text)
    analyze(kernels, parse_res_usage(res_text), list(patterns) + list(patterns90))
    return kernels, check(kernels, patterns, pattern_texts, gemm_archs, patterns90, pattern90_texts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--sass", help="output of cuobjdump -sass")
    ap.add_argument("--res", help="output of cuobjdump -res-usage")
    ap.add_argument("--patterns", help="expected GEMM kernels, one regex per line (gemm_kernels.txt:"
                    " an fh_eng::vec16 match on each cubin of --gemm-archs)")
    ap.add_argument("--patterns-sm90", help="expected wgmma GEMM kernels, one regex per line "
                    "(gemm_kernels_sm90.txt: an fh_eng::tma90 match on the sm_90a cubin)")
    ap.add_argument("--md", help="Markdown table to write")
    ap.add_argument("--csv", help="CSV table to write")
    ap.add_argument("--gemm-archs", default=os.environ.get("FH_SASS_GEMM_ARCHS", "sm_80 sm_90a"),
                    help="where gemm_kernels.txt must match; gemm_kernels_sm90.txt is checked when "
                    "sm_90a is listed (empty: neither is checked)")
    ap.add_argument("--enforce", default=os.environ.get("FH_SASS_ENFORCE", "1"))
    a = ap.parse_args()
    if a.self_test:
        from sass_table_selftest import self_test  # the checks on canned SASS, beside this file
        return self_test(os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata"))
    if not a.sass or not a.res:
        ap.error("--sass and --res are required")
    with open(a.sass) as f:
        sass = f.read()
    with open(a.res) as f:
        res = f.read()
    pats, texts = load_patterns(a.patterns)
    pats90, texts90 = load_patterns(a.patterns_sm90)
    kernels, viol = run(sass, res, pats, texts, a.gemm_archs.split(), pats90, texts90)
    if not kernels:
        print("sass_table: no kernels in the disassembly (is the CUDA backend built?)")
        return 2
    md = markdown(kernels)
    if a.md:
        with open(a.md, "w") as f:
            f.write("<!-- generated by scripts/sass_table.sh; see docs/sass.md -->\n")
            f.write(md)
    if a.csv:
        write_csv(kernels, a.csv)
    gemm = [k for k in kernels if k.cls]
    print("GEMM kernels (class vec16/tma90/scalar: engine tags, tma90 on sm_90a only; gemm: matched "
          "by scripts/gemm_kernels.txt):")
    print(markdown(gemm) if gemm else "(none)\n", end="")
    for line in summary(kernels, viol):
        print(line)
    spills = [m for r, m in viol if r == "a"]
    rule_b = [m for r, m in viol if r == "b"]
    for m in spills:
        print("sass: FAIL (a) " + m)
    enforce = a.enforce not in ("0", "no", "false", "off")
    for m in rule_b:
        print("sass: %s (b) %s" % ("FAIL" if enforce else "violation (not enforced)", m))
    if spills or (rule_b and enforce):
        print("sass: FAILED: %d spill violations, %d GEMM violations%s" % (
            len(spills), len(rule_b), "" if enforce else " (rule (b) not enforced: FH_SASS_ENFORCE=0)"))
        return 1
    print("sass: OK%s" % ("" if not rule_b else
                          " (rule (b) reported only, FH_SASS_ENFORCE=0: %d violations)" % len(rule_b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
