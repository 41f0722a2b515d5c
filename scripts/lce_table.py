#!/usr/bin/env python3
"""Turn bench_linear_ce's CSV (and, optionally, the workspace lines the kernel suite prints) into
markdown tables, and optionally a plot.

  build-test/bench_linear_ce > lce.csv
  test_kernel --filter 'kernel_linear_ce_bwd/workspace*' --verbose > ws.txt
  scripts/lce_table.py lce.csv --workspace ws.txt [--plot lce.png]

Lines starting with '#' are comments. Projection rows are an analytic roofline model, never a
measurement; the tables say so in their titles. The plot needs matplotlib and is skipped (with a
message on stderr) when it is not installed."""
import argparse
import csv
import io
import sys

# CCE paper Table 1 (Gemma 2 2B shape, A100-SXM4-80GB), MB = MiB; docs/linear_ce.md, "Published numbers".
CCE_TABLE1 = {"forward": "CCE loss 1 MB", "fp32": "CCE-Kahan 2326 MB", "output_dtype": "CCE loss+grad 1164 MB",
              "deterministic": "CCE-Kahan 2326 MB"}


def read_rows(path):
    with open(path) as f:
        text = "".join(line for line in f if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(text)))


def read_engine(path):
    """kind=engine rows (their own columns, see bench_linear_ce.c engine_model)."""
    keys = ["kind", "label", "N", "V", "D", "dtype", "pass", "flops", "l2_bytes", "gpu", "mma_ms", "l2_ms", "note"]
    with open(path) as f:
        return [dict(zip(keys, line.strip().split(",", len(keys) - 1))) for line in f if line.startswith("engine,")]


def read_workspace(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("workspace,") and not line.startswith("workspace,N,"):
                k = line.split(",")
                rows.append(dict(N=k[1], V=k[2], D=k[3], dtype=k[4], pass_=k[5], mode=k[6], ws=int(k[7]),
                                 ws_mib=float(k[8]), grads_mib=float(k[9]), total_mib=float(k[10])))
    return rows


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--workspace", help="kernel-suite output with 'workspace,...' lines")
    ap.add_argument("--plot", help="write a PNG of the projected times")
    a = ap.parse_args()
    rows = read_rows(a.csv)

    proj = [r for r in rows if r["kind"] == "projection"]
    if proj:
        devices = sorted({r["device"] for r in proj})
        keyed = {}
        for r in proj:
            key = (r["label"], r["N"], r["V"], r["D"], r["pass"], r["mode"])
            keyed.setdefault(key, {"flops": float(r["flops"]), "bytes": float(r["min_bytes"])})[r["device"]] = float(
                r["time_ms"])
        body = [[k[0], k[1], k[2], k[3], k[4], k[5], "%.2f" % (v["flops"] / 1e12), "%.2f" % (v["bytes"] / 2**30)] +
                ["%.1f" % v.get(d, float("nan")) for d in devices] for k, v in keyed.items()]
        print("**Projected roofline time (analytic model, not a measurement), bf16**\n")
        print(table(["shape", "N", "V", "D", "pass", "mode", "TFLOP", "min GiB"] + ["%s ms" % d for d in devices],
                    body))
        print()

    eng = read_engine(a.csv)
    if eng:
        print("**Tile-engine cost model (projection with assumed mma.sync and L2 rates, not a measurement), bf16**\n")
        print(table(["shape", "N", "V", "D", "pass", "TFLOP", "L2<->SM GB", "GPU", "mma ms", "L2 ms", "bound"],
                    [[r["label"], r["N"], r["V"], r["D"], r["pass"], "%.2f" % (float(r["flops"]) / 1e12),
                      "%.0f" % (float(r["l2_bytes"]) / 1e9), r["gpu"], r["mma_ms"], r["l2_ms"], r["note"]]
                     for r in eng]))
        print()

    ws = read_workspace(a.workspace) if a.workspace else []
    mem = [r for r in rows if r["kind"] == "memory"]
    if ws or mem:
        body = []
        for r in ws:
            ref = CCE_TABLE1.get("forward" if r["pass_"] == "forward" else r["mode"], "") if r["V"] == "256000" else ""
            body.append([r["N"], r["V"], r["D"], r["pass_"], r["mode"], "%.3f" % r["ws_mib"], "%.1f" % r["grads_mib"],
                         "%.1f" % r["total_mib"], ref])
        for r in mem:
            body.append([r["N"], r["V"], r["D"], r["pass"], r["mode"], "%.3f" % (int(r["ws_bytes"]) / 2**20), "",
                         r["total_mib"], ""])
        print("**Memory from the workspace queries (MiB; gradients in bf16; lower bound dE + dC = 1161 MiB at the "
              "Gemma-2 shape)**\n")
        print(table(["N", "V", "D", "pass", "mode", "workspace", "gradients", "total", "CCE Table 1"], body))
        print()

    cpu = [r for r in rows if r["kind"] == "cpu"]
    if cpu:
        print("**CPU reference backend, measured (not a GPU number)**\n")
        print(table(["N", "V", "D", "dtype", "pass", "median ms", "spread ms", "GFLOP/s"],
                    [[r["N"], r["V"], r["D"], r["dtype"], r["pass"], r["time_ms"], r["spread_ms"],
                      "%.2f" % (float(r["tflops"]) * 1e3)] for r in cpu]))
        print()

    if a.plot and proj:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("lce_table.py: matplotlib is not installed; no plot written", file=sys.stderr)
            return
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for d in devices:
            pts = [(int(r["N"]), float(r["time_ms"])) for r in proj
                   if r["device"] == d and r["label"] == "liger" and r["pass"] == "forward+backward" and r["mode"] == "fp32"]
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=d)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (tokens), H=4096, V=128256, bf16")
        ax.set_ylabel("projected ms (roofline, not measured)")
        ax.set_title("fusedhead linear CE forward+backward: roofline projection")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
