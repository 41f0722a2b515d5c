#!/usr/bin/env python3
"""bench_anchors: fusedhead's linear cross-entropy side by side with its anchors, on one GPU.

Times, in one Python process, at the Cut Cross-Entropy shape (N=8192, D=2304, V=256000) and the
Liger-Kernel shape (N=8192, D=4096, V=128256), bf16, mean over the rows, the passes "forward" and
"forward+backward" of:
  fusedhead           fusedhead.linear_cross_entropy(e, c, targets) on CUDA tensors (defaults:
                      filter_eps auto, accum_mode fp32)
  fusedhead-nofilter  the same with filter_eps=0 (every logit tile's gradient computed)
  eager               F.cross_entropy(F.linear(e, c).float(), targets): bf16 logits, fp32 loss
  liger               liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(c, e, targets)
                      (weight first; it computes the gradient inside its forward)
  cce                 cut_cross_entropy.linear_cross_entropy(e, c, targets) (its default filter)
  cce-nofilter        the same with filter_eps=None
and, through the C program bench/bench_linear_ce (--bench-exe; its CUDA path, its own inputs; run
right after fusedhead, with its repetitions cut to about 2 · --method-budget seconds):
  cublas-baseline     cuBLAS logits + unfused row kernels + cuBLAS gradient GEMMs
  fusedhead-c-<mode>  the C API directly, per accumulation mode
The anchors are imported when present (scripts/fetch_anchors.sh installs them into
third_party/anchors, which scripts/gpu_check.sh puts on PYTHONPATH); otherwise their rows say
"not available".

Inputs (the same for every Python method): E ~ U(-1, 1), C ~ 6/sqrt(D)·U(-1, 1) (logits of standard
deviation about 2, as bench_linear_ce), targets uniform in [0, V), no ignored rows; e and c require
grad. Random logits make almost every probability tiny, so gradient filters (fusedhead, CCE) skip
nearly every tile: the *-nofilter rows give the cost without that help.

Timing: CUDA events around each call on the current stream, --warmup untimed calls (Triton compiles
there), then --reps timed calls (fewer, at least 3, where they would take more than --method-budget
seconds at the last warm-up call's duration), each after an L2 flush (zeroing a buffer of twice the L2 size,
outside the timed region) and with e.grad = c.grad = None. median_ms is the median, spread_ms
max - min. peak_mib: torch.cuda.max_memory_allocated() over the timed calls minus the memory
allocated before them (inputs, targets and flush buffer excluded; gradients included), in MiB. tflops:
useful FLOPs / median, 2·N·V·D per GEMM (forward 1 GEMM, forward+backward 3: logits, dE, dC),
whatever a method recomputes. C rows: their own CUDA-event medians; their peak_mib is the
workspace query plus the bf16 gradients (not a measurement); their tflops use the same formula.

Robustness: every (shape, method) runs under try/except and an alarm (--method-timeout); a
watchdog (faulthandler) ends the process if a call hangs in C. The CSV is written row by row and a
marker file names the method running, so a rerun with --resume skips rows already written and records
the method that killed the previous process as "crashed". --deadline stops starting methods when the
time budget is spent ("skipped: time budget"). Exit status: 0 (even when methods failed; see the
status column), 3 parity check failed, 2 usage, 4 --device cuda but torch sees no CUDA device, 75 the
CUDA context broke (rerun with --resume); the watchdog's exit is 1.

Without a GPU: --device cpu --small runs tiny shapes with fusedhead (CPU backend) and eager only,
wall-clock timing, no memory column: a smoke test of this script, not a benchmark.
"""
import argparse
import csv
import datetime
import faulthandler
import importlib
import importlib.util
import inspect
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
except ImportError as _exc:
    print("bench_anchors: this Python (%s) has no PyTorch: %s" % (sys.executable, _exc))
    sys.exit(4)

# label -> (N, D, V)
SHAPES = {"cce": (8192, 2304, 256000), "liger": (8192, 4096, 128256)}
SMALL_SHAPES = {"cce-small": (64, 48, 1000), "liger-small": (48, 64, 515)}
PASSES = ("forward", "forward+backward")
PY_METHODS = ("fusedhead", "eager", "cce", "liger", "fusedhead-nofilter", "cce-nofilter")
CPU_METHODS = ("fusedhead", "fusedhead-nofilter", "eager")
ANCHOR_PACKAGE = {"liger": "liger-kernel", "cce": "cut-cross-entropy", "cce-nofilter": "cut-cross-entropy"}
COLUMNS = ["gpu", "driver", "cuda", "torch", "date", "commit", "shape", "N", "D", "V", "dtype", "method",
           "version", "pass", "status", "median_ms", "spread_ms", "reps", "peak_mib", "tflops", "loss", "source",
           "note"]
EXIT_PARITY, EXIT_USAGE, EXIT_NO_CUDA, EXIT_CONTEXT = 3, 2, 4, 75


class MethodTimeout(Exception):
    pass


class ContextLost(Exception):
    pass


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit():
    if os.environ.get("FH_GIT_COMMIT"):
        return os.environ["FH_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return "unknown"
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device):
    env = {"gpu": "cpu:" + (platform.processor() or platform.machine()), "driver": "", "cuda": "",
           "torch": torch.__version__, "date": now_utc(), "commit": git_commit()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda or ""
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return env


def package_version(dist):
    try:
        from importlib import metadata
        return metadata.version(dist)
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return ""


# ---------------------------------------------------------------------------------------------
# The methods: each factory returns (callable() -> scalar loss, version string) or raises
# ---------------------------------------------------------------------------------------------

def make_fusedhead(e, c, t, filter_eps=None):
    import fusedhead
    return (lambda: fusedhead.linear_cross_entropy(e, c, t, filter_eps=filter_eps)), fusedhead.version()


def make_eager(e, c, t):
    return (lambda: F.cross_entropy(F.linear(e, c).float(), t)), "torch " + torch.__version__


def make_liger(e, c, t):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    mod = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    # forward(lin_weight, _input, target, bias=None): the weight comes first.
    return (lambda: mod(c, e, t)), package_version("liger-kernel")


def make_cce(e, c, t, nofilter=False):
    cce = importlib.import_module("cut_cross_entropy")
    fn = cce.linear_cross_entropy
    kwargs = {"reduction": "mean"}
    if nofilter:
        if "filter_eps" not in inspect.signature(fn).parameters:
            raise RuntimeError("this cut_cross_entropy.linear_cross_entropy has no filter_eps")
        kwargs["filter_eps"] = None
    version = getattr(cce, "__version__", "") or package_version("cut-cross-entropy")
    return (lambda: fn(e, c, t, **kwargs)), version


FACTORIES = {
    "fusedhead": lambda e, c, t: make_fusedhead(e, c, t),
    "fusedhead-nofilter": lambda e, c, t: make_fusedhead(e, c, t, filter_eps=0.0),
    "eager": make_eager,
    "liger": make_liger,
    "cce": lambda e, c, t: make_cce(e, c, t),
    "cce-nofilter": lambda e, c, t: make_cce(e, c, t, nofilter=True),
}


def anchor_available(method):
    """None when the method can be imported here, else the reason."""
    mod = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "cce-nofilter": "cut_cross_entropy"}.get(method)
    if mod is None:
        return None
    if importlib.util.find_spec(mod) is None:
        return "not available (%s not installed; run scripts/fetch_anchors.sh)" % ANCHOR_PACKAGE[method]
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def make_inputs(N, D, V, device, dtype, seed=0):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    # Drawn in fp32 on the device, then rounded to dtype.
    e = (torch.rand(N, D, generator=g, device=device) * 2 - 1).to(dtype).requires_grad_(True)
    c = ((torch.rand(V, D, generator=g, device=device) * 2 - 1) * (6.0 / math.sqrt(D))).to(dtype)
    c.requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g, device=device)
    return e, c, t


class Timer:
    def __init__(self, device):
        self.device = device
        self.flush = None
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
            self.flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")

    def run(self, fn, e, c, backward, warmup, reps, budget_s=0.0):
        """Returns (times_ms, peak_mib or None, first timed loss). With budget_s > 0 and a warm-up,
        the timed calls are cut to fit budget_s at the last warm-up call's duration (at least 3)."""
        cuda = self.device == "cuda"
        times, loss_value = [], None
        peak = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        r, ms = -warmup, 0.0
        while r < reps:
            if r == 0 and warmup > 0 and budget_s > 0 and ms > 0:
                reps = max(3, min(reps, int(budget_s * 1e3 / ms)))
            e.grad = None
            c.grad = None
            if r == 0 and cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            if cuda:
                self.flush.zero_()
                start.record()
            else:
                t0 = time.perf_counter()
            loss = fn()
            if backward:
                loss.backward()
            if cuda:
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            if r >= 0:
                times.append(ms)
            if r == 0:
                loss_value = float(loss.detach().float())
            del loss
            r += 1
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 1048576.0
        e.grad = None
        c.grad = None
        return times, peak, loss_value


# ---------------------------------------------------------------------------------------------
# Parity of the Python binding on the chosen device (small shape, fp64 reference)
# ---------------------------------------------------------------------------------------------

def parity(device, log):
    """fusedhead.linear_cross_entropy against an fp64 PyTorch reference on the same (rounded) inputs:
    3-D e, ignored rows, every dtype; filter off so that the gradients are exact up to rounding.
    Returns True when every check passes."""
    import fusedhead
    ok = True
    B, T, D, V = 2, 96, 136, 4099
    for dtype, tol_loss, tol_grad in ((torch.float32, 1e-3, 1e-2), (torch.float16, 2e-3, 2e-2),
                                      (torch.bfloat16, 2e-3, 2e-2)):
        g = torch.Generator(device="cpu")
        g.manual_seed(7)
        e0 = (torch.rand(B, T, D, generator=g) * 2 - 1).to(dtype)
        c0 = ((torch.rand(V, D, generator=g) * 2 - 1) * (6.0 / math.sqrt(D))).to(dtype)
        t0 = torch.randint(0, V, (B, T), generator=g)
        t0[0, :5] = -100
        e = e0.to(device, copy=True).requires_grad_(True)
        c = c0.to(device, copy=True).requires_grad_(True)
        loss = fusedhead.linear_cross_entropy(e, c, t0.to(device), filter_eps=0.0)
        loss.backward()
        er = e0.double().requires_grad_(True)
        cr = c0.double().requires_grad_(True)
        ref = F.cross_entropy(F.linear(er, cr).reshape(-1, V), t0.reshape(-1), ignore_index=-100)
        ref.backward()

        def rel(a, b):
            a = a.detach().double().cpu()
            return float((a - b.detach()).norm() / b.detach().norm().clamp_min(1e-300))
        r_loss, r_de, r_dc = rel(loss, ref), rel(e.grad, er.grad), rel(c.grad, cr.grad)
        good = r_loss <= tol_loss and r_de <= tol_grad and r_dc <= tol_grad and math.isfinite(r_loss)
        ok &= good
        log("parity %s %s: loss rel %.2e (tol %.0e), dE rel %.2e, dC rel %.2e (tol %.0e): %s" % (
            device, str(dtype).replace("torch.", ""), r_loss, tol_loss, r_de, r_dc, tol_grad,
            "ok" if good else "FAILED"))
    return ok


# ---------------------------------------------------------------------------------------------
# The C bench (cuBLAS baseline and the C API)
# ---------------------------------------------------------------------------------------------

def run_c_bench(exe, N, D, V, warmup, reps, timeout_s):
    """Runs bench_linear_ce at one shape; returns (rows, notes) where rows are dicts with method, pass,
    status, median_ms, spread_ms, peak_mib, note."""
    cmd = [exe, "--gpu-shape", str(N), str(V), str(D), "--warmup", str(warmup), "--gpu-reps", str(reps),
           "--cpu-shape", "4", "16", "8", "--reps", "1"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        stdout, rc, stderr = out.stdout, out.returncode, out.stderr
    except subprocess.TimeoutExpired as exc:  # keep the rows printed before the timeout
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, stderr = None, "timed out after %.0f s" % timeout_s
    rows, notes = [], []
    for line in stdout.splitlines():
        if line.startswith(("# validate", "# skip", "# device", "# gpu")):
            notes.append(line[2:])
        if not line.startswith("gpu,"):
            continue
        f = line.split(",")
        # kind,label,N,V,D,dtype,pass,mode,flops,min_bytes,device,time_ms,spread_ms,tflops,ws_bytes,total_mib,note,gbs
        mode = f[7]
        method = "cublas-baseline" if mode == "baseline" else "fusedhead-c-" + (mode if mode != "-" else "fp32")
        rows.append({"method": method, "pass": f[6], "median_ms": float(f[11]), "spread_ms": float(f[12]),
                     "peak_mib": float(f[15]), "note": "bench_linear_ce " + f[16] + "; peak_mib = workspace query"
                     + (" + bf16 gradients" if f[6] != "forward" else "") + " (not measured)"})
    if rc is None:
        notes.append("bench_linear_ce " + stderr)
    elif rc != 0:
        notes.append("bench_linear_ce exited %d: %s" % (rc, (stderr or "").strip()[-300:]))
    return rows, notes, rc is None


# ---------------------------------------------------------------------------------------------
# CSV, resume, summary
# ---------------------------------------------------------------------------------------------

class Results:
    def __init__(self, path, env, resume):
        self.path, self.env = path, env
        self.rows = []
        self.done = set()
        self.marker = path + ".running"
        existing = resume and os.path.exists(path) and os.path.getsize(path) > 0
        if existing:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    self.rows.append(row)
                    self.done.add((row["shape"], row["method"], row["pass"]))
        else:
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
        if resume and os.path.exists(self.marker):
            with open(self.marker) as f:
                parts = f.read().split()
            if len(parts) == 5:
                shape, method, N, D, V = parts
                for p in PASSES:
                    if (shape, method, p) not in self.done:
                        self.add(shape, (int(N), int(D), int(V)), method, p, status="crashed: the process ended "
                                 "during this method (killed by the watchdog, a fault, or the GPU)", source="python")
        self.clear_marker()

    def is_done(self, shape, method, pass_):
        return (shape, method, pass_) in self.done

    def add(self, shape, ndv, method, pass_, status, version="", times=None, peak=None, loss=None, source="python",
            note="", median=None, spread=None, dtype="bf16", reps=""):
        N, D, V = ndv
        if times:
            reps = len(times)
        if times:
            median = statistics.median(times)
            spread = max(times) - min(times)
        gemms = 1 if pass_ == "forward" else 3 if pass_ == "forward+backward" else 2
        tf = 2.0 * gemms * N * V * D / (median * 1e-3) / 1e12 if median else None
        tflops = "" if tf is None else "%.1f" % tf if tf >= 1 else "%.3g" % tf
        row = dict(self.env)
        row.update({"shape": shape, "N": N, "D": D, "V": V, "dtype": dtype, "method": method, "version": version,
                    "pass": pass_, "status": status, "median_ms": "" if median is None else "%.3f" % median,
                    "spread_ms": "" if spread is None else "%.3f" % spread, "reps": reps,
                    "peak_mib": "" if peak is None else "%.1f" % peak, "tflops": tflops,
                    "loss": "" if loss is None else "%.6g" % loss, "source": source, "note": note})
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})
        self.done.add((shape, method, pass_))

    def set_marker(self, shape, method, ndv):
        with open(self.marker, "w") as f:
            f.write("%s %s %d %d %d\n" % ((shape, method) + tuple(ndv)))

    def clear_marker(self):
        if os.path.exists(self.marker):
            os.remove(self.marker)


def fnum(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def summary(results, env, args, shapes, parity_lines):
    out = ["# fusedhead GPU check: linear cross-entropy beside its anchors", ""]
    out.append("- device: %s, driver %s, CUDA %s, torch %s" % (env["gpu"], env["driver"] or "?", env["cuda"] or "?",
                                                               env["torch"]))
    out.append("- commit %s, %s" % (env["commit"], env["date"]))
    out.append("- bf16, mean over the rows, no ignored rows; E ~ U(-1,1), C ~ 6/sqrt(D)·U(-1,1), uniform targets; "
               "median of %d timed calls after %d warm-up (%s)" % (
                   args.reps, args.warmup, "CUDA events, L2 flushed" if args.device == "cuda" else "wall clock, CPU"))
    out.append("- peak MiB: max_memory_allocated over the timed calls minus what was allocated before (C rows: "
               "workspace query + gradients, marked *); TFLOP/s: 2·N·V·D per GEMM (1 forward, 3 forward+backward)")
    out.append("- `× fh time` = method median / fusedhead median (> 1: fusedhead is faster); `× fh mem` likewise for "
               "memory; `loss Δ` = relative difference to the eager loss (same inputs; C rows use their own inputs)")
    # The headline: fusedhead against each anchor, one row per (shape, pass).
    anchors = ["cublas-baseline", "eager", "liger", "cce", "cce-nofilter"]
    out.append("")
    out.append("fusedhead against each anchor: anchor time / fusedhead time (> 1: fusedhead faster), and in brackets "
               "anchor peak MiB / fusedhead peak MiB; '-' where either did not run:")
    out.append("")
    out.append("| shape | pass | fusedhead ms | fusedhead MiB | " + " | ".join(anchors) + " |")
    out.append("|---|---|---:|---:|" + "---:|" * len(anchors))
    for shape in shapes:
        for p in PASSES:
            ref = {r["method"]: r for r in results.rows if r["shape"] == shape and r["pass"] == p}
            fh = ref.get("fusedhead", {})
            fh_ms, fh_mib = fnum(fh.get("median_ms")), fnum(fh.get("peak_mib"))
            cells = []
            for a in anchors:
                r = ref.get(a, {})
                ms, mib = fnum(r.get("median_ms")), fnum(r.get("peak_mib"))
                if not ms or not fh_ms:
                    cells.append("-")
                    continue
                cell = "%.2f×" % (ms / fh_ms)
                if mib and fh_mib and mib > 0 and fh_mib > 0:
                    cell += " (%.2f×%s)" % (mib / fh_mib, "*" if a == "cublas-baseline" else "")
                cells.append(cell)
            out.append("| %s | %s | %s | %s | %s |" % (shape, p, "%.2f" % fh_ms if fh_ms else "-",
                                                       "%.0f" % fh_mib if fh_mib is not None else "-",
                                                       " | ".join(cells)))
    if parity_lines:
        out.append("")
        out.append("Python binding parity (fp64 reference, filter off):")
        out.extend("- " + p for p in parity_lines)
    for shape, (N, D, V) in shapes.items():
        for p in PASSES:
            rows = [r for r in results.rows if r["shape"] == shape and r["pass"] == p]
            if not rows:
                continue
            ref = {r["method"]: r for r in rows}
            fh = ref.get("fusedhead")
            fh_ms = fnum(fh["median_ms"]) if fh else None
            fh_mib = fnum(fh["peak_mib"]) if fh else None
            eager_loss = fnum(ref["eager"]["loss"]) if "eager" in ref else None
            out.append("")
            out.append("## %s shape (N=%d, D=%d, V=%d), %s" % (shape, N, D, V, p))
            out.append("")
            out.append("| method | version | status | median ms | spread ms | peak MiB | TFLOP/s | × fh time | × fh mem "
                       "| loss Δ |")
            out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                ms, mib, loss = fnum(r["median_ms"]), fnum(r["peak_mib"]), fnum(r["loss"])
                c_row = r["source"] == "bench_linear_ce"
                status = r["status"] if len(r["status"]) <= 60 else r["status"][:57] + "..."
                out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    r["method"], r["version"], status.replace("|", "/"),
                    "%.2f" % ms if ms is not None else "", r["spread_ms"],
                    ("%.0f%s" % (mib, "*" if c_row else "")) if mib is not None else "",
                    r["tflops"],
                    "%.2f" % (ms / fh_ms) if ms and fh_ms else "",
                    "%.2f" % (mib / fh_mib) if mib and fh_mib and mib > 0 and fh_mib > 0 else "",
                    "%.1e" % (abs(loss - eager_loss) / abs(eager_loss))
                    if loss is not None and eager_loss and not c_row else ""))
    notes = [r for r in results.rows if r["source"] == "bench_linear_ce" and r["method"] == "notes"]
    for n in notes:
        out.append("")
        out.append("bench_linear_ce (%s): %s" % (n["shape"], n["note"]))
    out.append("")
    out.append("Full rows: %s. Measured on the machine named above; no number holds for another GPU." % args.csv)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke test, not a benchmark)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape labels (default: all)")
    ap.add_argument("--methods", default=None, help="comma-separated Python methods (default: all for the device)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bench-exe", default=None, help="bench_linear_ce built with the CUDA backend")
    ap.add_argument("--csv", default=os.path.join(ROOT, "build-gpu", "gpu_check.csv"))
    ap.add_argument("--summary", default=None, help="markdown summary (default: next to the CSV)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --csv and skip them")
    ap.add_argument("--method-timeout", type=float, default=120.0, help="seconds per (shape, method, pass)")
    ap.add_argument("--method-budget", type=float, default=20.0, help="seconds the timed calls of one (shape, "
                    "method, pass) should take: fewer repetitions (at least 3) for slow methods; 0: always --reps")
    ap.add_argument("--deadline", type=float, default=0.0, help="seconds from now after which no method starts")
    ap.add_argument("--no-parity", action="store_true", help="skip the parity check (its last result, if saved "
                    "next to the CSV, is still summarised)")
    ap.add_argument("--summary-only", action="store_true", help="only rewrite the summary from the rows in --csv")
    args = ap.parse_args()
    if args.warmup < 0 or args.reps < 1:
        ap.error("--warmup must be >= 0 and --reps >= 1")
    t_start = time.time()
    deadline = t_start + args.deadline if args.deadline > 0 else None
    if args.summary is None:
        args.summary = os.path.join(os.path.dirname(os.path.abspath(args.csv)), "gpu_check_summary.md")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_anchors: torch sees no CUDA device: nothing to do (use --device cpu --small for a smoke test)")
        return EXIT_NO_CUDA
    all_shapes = SMALL_SHAPES if args.small else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = [s for s in wanted if s not in all_shapes]
        if unknown:
            ap.error("unknown shape(s) %s (have %s)" % (", ".join(unknown), ", ".join(all_shapes)))
        shapes = {s: all_shapes[s] for s in wanted}
    else:
        shapes = dict(all_shapes)
    methods = list(PY_METHODS if device == "cuda" else CPU_METHODS)
    if args.methods:
        methods = args.methods.split(",")
        unknown = [m for m in methods if m not in FACTORIES]
        if unknown:
            ap.error("unknown method(s) %s" % ", ".join(unknown))
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    def log(msg):
        print("bench_anchors: " + msg, flush=True)

    env = environment(device)
    log("%s | driver %s | CUDA %s | torch %s | commit %s" % (env["gpu"], env["driver"] or "-", env["cuda"] or "-",
                                                             env["torch"], env["commit"]))
    try:
        import fusedhead
        log("fusedhead %s from %s" % (fusedhead.version(), fusedhead.library_path))
    except Exception as exc:  # noqa: BLE001
        log("fusedhead cannot be loaded (%s); its rows will fail" % exc)
    for m in ("liger", "cce"):
        why = anchor_available(m)
        log("%s: %s" % (ANCHOR_PACKAGE[m], why or "found, version " + (package_version(ANCHOR_PACKAGE[m]) or "?")))

    results = Results(args.csv, env, args.resume or args.summary_only)
    rc = 0
    parity_lines = []
    parity_file = args.csv + ".parity.txt"
    if args.no_parity or args.summary_only:
        if os.path.exists(parity_file):
            with open(parity_file) as f:
                parity_lines = [line.rstrip("\n") for line in f if line.strip()]
    else:
        try:
            ok = parity(device, lambda s: (parity_lines.append(s), log(s)))
        except Exception as exc:  # noqa: BLE001
            ok = False
            parity_lines.append("parity raised %s: %s" % (type(exc).__name__, exc))
            log(parity_lines[-1])
        if not ok:
            rc = EXIT_PARITY
        with open(parity_file, "w") as f:
            f.write("".join(line + "\n" for line in parity_lines))

    def on_alarm(signum, frame):
        raise MethodTimeout("over %.0f s" % args.method_timeout)
    signal.signal(signal.SIGALRM, on_alarm)
    timer = None

    def c_bench(shape, ndv):
        """bench_linear_ce at this shape, its repetitions cut to about 2 method budgets from the Python
        fusedhead forward+backward time (it times 7 fusedhead passes and 3 baseline passes)."""
        N, D, V = ndv
        if device != "cuda" or not args.bench_exe:
            return
        if all(results.is_done(shape, "cublas-baseline", p) for p in PASSES):
            log("%s: bench_linear_ce rows already present" % shape)
            return
        if deadline and time.time() > deadline:
            for p in PASSES:
                results.add(shape, ndv, "cublas-baseline", p, "skipped: time budget", source="bench_linear_ce")
            return
        if not os.access(args.bench_exe, os.X_OK):
            for p in PASSES:
                results.add(shape, ndv, "cublas-baseline", p, "not available (no %s)" % args.bench_exe,
                            source="bench_linear_ce")
            return
        reps = args.reps
        fb = [r for r in results.rows if r["shape"] == shape and r["method"] == "fusedhead"
              and r["pass"] == "forward+backward"]
        t_fb = fnum(fb[0]["median_ms"]) if fb else None
        if t_fb and args.method_budget > 0:
            reps = max(3, min(reps, int(2 * args.method_budget / (10 * t_fb * 1e-3)) - args.warmup))
        timeout_s = args.method_timeout * 3
        if deadline:
            timeout_s = max(30.0, min(timeout_s, deadline - time.time() + 30))
        log("%s: bench_linear_ce --gpu-shape %d %d %d --gpu-reps %d" % (shape, N, V, D, reps))
        torch.cuda.empty_cache()
        try:
            crow, notes, timed_out = run_c_bench(args.bench_exe, N, D, V, args.warmup, reps, timeout_s)
        except OSError as exc:
            for p in PASSES:
                results.add(shape, ndv, "cublas-baseline", p, "failed: %s" % exc, source="bench_linear_ce")
            return
        for r in crow:
            results.add(shape, ndv, r["method"], r["pass"], "ok", version=env["commit"], median=r["median_ms"],
                        spread=r["spread_ms"], peak=r["peak_mib"], source="bench_linear_ce", note=r["note"], reps=reps)
        for p in PASSES:
            if not results.is_done(shape, "cublas-baseline", p):
                results.add(shape, ndv, "cublas-baseline", p, ("timeout" if timed_out else "failed: no row")
                            + " (bench_linear_ce; see the notes)", source="bench_linear_ce")
        if notes:
            results.add(shape, ndv, "notes", "-", "info", source="bench_linear_ce", note=" | ".join(notes))
        for n in notes:
            log("  " + n)

    for shape, ndv in ([] if args.summary_only else shapes.items()):
        N, D, V = ndv
        # 2. the Python methods on one set of inputs
        todo = [m for m in methods if not all(results.is_done(shape, m, p) for p in PASSES)]
        # The C program runs right after fusedhead (its repetitions follow fusedhead's time).
        c_after = "fusedhead" if "fusedhead" in todo else None
        if c_after is None:
            c_bench(shape, ndv)
        if not todo:
            continue
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                if timer is None:
                    timer = Timer(device)
            elif timer is None:
                timer = Timer(device)
            e, c, t = make_inputs(N, D, V, device, torch.bfloat16)
        except Exception as exc:  # noqa: BLE001
            for m in todo:
                for p in PASSES:
                    if not results.is_done(shape, m, p):
                        results.add(shape, ndv, m, p, "failed: inputs: %s" % exc)
            if c_after:
                c_bench(shape, ndv)
            continue
        for m in todo:
            why = anchor_available(m)
            if why is None and device == "cpu" and m in ANCHOR_PACKAGE:
                why = "not available (needs CUDA and Triton)"
            if why:
                for p in PASSES:
                    if not results.is_done(shape, m, p):
                        results.add(shape, ndv, m, p, why, version=package_version(ANCHOR_PACKAGE[m]))
                log("%s %s: %s" % (shape, m, why))
                if m == c_after:
                    c_bench(shape, ndv)
                continue
            results.set_marker(shape, m, ndv)
            version = ""
            try:
                fn, version = FACTORIES[m](e, c, t)
            except Exception as exc:  # noqa: BLE001
                for p in PASSES:
                    if not results.is_done(shape, m, p):
                        results.add(shape, ndv, m, p, "failed: import/setup: %s: %s" % (type(exc).__name__, exc),
                                    version=version or package_version(ANCHOR_PACKAGE.get(m, "")))
                log("%s %s: setup failed: %s" % (shape, m, exc))
                results.clear_marker()
                if m == c_after:
                    c_bench(shape, ndv)
                continue
            for p in PASSES:
                if results.is_done(shape, m, p):
                    continue
                if deadline and time.time() > deadline:
                    results.add(shape, ndv, m, p, "skipped: time budget", version=version)
                    log("%s %s %s: skipped (time budget)" % (shape, m, p))
                    continue
                # The alarm raises between Python bytecodes; the watchdog ends a process stuck in C.
                signal.alarm(max(1, int(args.method_timeout)))
                faulthandler.dump_traceback_later(args.method_timeout + 30, exit=True)
                try:
                    times, peak, loss = timer.run(fn, e, c, p == "forward+backward", args.warmup, args.reps,
                                                  args.method_budget)
                    status = "ok" if math.isfinite(loss) else "ok (loss not finite)"
                    results.add(shape, ndv, m, p, status, version=version, times=times, peak=peak, loss=loss,
                                note="liger computes the gradient inside its forward" if m == "liger" else "")
                    log("%s %s %s: median %.3f ms, spread %.3f ms%s, loss %.6g" % (
                        shape, m, p, statistics.median(times), max(times) - min(times),
                        "" if peak is None else ", peak %.0f MiB" % peak, loss))
                except MethodTimeout as exc:
                    results.add(shape, ndv, m, p, "timeout: %s" % exc, version=version)
                    log("%s %s %s: timeout" % (shape, m, p))
                except Exception as exc:  # noqa: BLE001 - OOM, Triton compile errors, anything
                    msg = "%s: %s" % (type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                    results.add(shape, ndv, m, p, "failed: " + msg[:300], version=version)
                    log("%s %s %s: failed: %s" % (shape, m, p, msg[:300]))
                finally:
                    signal.alarm(0)
                    faulthandler.cancel_dump_traceback_later()
                e.grad = None
                c.grad = None
                if device == "cuda":
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception as exc:  # noqa: BLE001 - a sticky CUDA error poisons the context
                        results.clear_marker()
                        log("the CUDA context is broken after %s (%s): rerun with --resume" % (m, exc))
                        return EXIT_CONTEXT
            results.clear_marker()
            del fn
            if m == c_after:
                c_bench(shape, ndv)
        del e, c, t

    text = summary(results, env, args, shapes, parity_lines)
    with open(args.summary, "w") as f:
        f.write(text)
    print()
    print(text)
    log("CSV %s, summary %s, %.0f s" % (args.csv, args.summary, time.time() - t_start))
    return rc


if __name__ == "__main__":
    sys.exit(main())
