"""Ranges over several benchmark runs, as the README's speed table shows them.

    for i in 1 2 3; do
        python benchmarks/bench_meanfield.py --json benchmarks/results/meanfield-$i.json
        python benchmarks/bench_folders.py --json benchmarks/results/folders-$i.json
    done
    python benchmarks/summarize_runs.py benchmarks/results/meanfield-*.json benchmarks/results/folders-*.json

Each run's figure is already a median (of per-round ratios, then over images); a cell gives the lowest and
highest of the runs' figures (``a-b``), with the spread of the per-image medians over all runs in brackets.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _span(xs, fmt="{:.2f}") -> str:
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def densecrf_rows(runs) -> list[str]:
    groups: dict = {}
    for run in runs:
        for s in run["meanfield"]["densecrf"]:
            groups.setdefault((s["kernels"], s["size"], s["labels"], s["threads"]), []).append(s)
    out = ["| kernels, T=10 | size, labels | threads | images | pydensecrf2 ms | crfrnn ms | ratio (per-image spread) "
           "| MAP agreement (min) |", "|---|---|---|---|---|---|---|---|"]
    for (k, size, labels, th), rs in groups.items():
        out.append(f"| {k} | {size}, L={labels} | {th} | {rs[0]['images']} | {_span([r['pydensecrf_ms'] for r in rs], '{:.0f}')} "
                   f"| {_span([r['crfrnn_ms'] for r in rs], '{:.0f}')} | **{_span([r['ratio_median'] for r in rs])}** "
                   f"({min(r['ratio_min'] for r in rs):.2f}-{max(r['ratio_max'] for r in rs):.2f}) "
                   f"| {100 * min(r['map_agreement_min'] for r in rs):.2f} % |")
    return out


def scaling_rows(runs) -> list[str]:
    groups: dict = {}
    for run in runs:
        for s in run["meanfield"].get("scaling", []):
            groups.setdefault((s["kernels"], s["threads"]), []).append(s)
    def cpu(rs) -> str:  # runs from before the CPU times were recorded have none
        if not all("user_growth_median" in r for r in rs):
            return ""
        return (f"; user CPU time {_span([r['user_growth_median'] for r in rs])}x, system time at 1000x750 "
                f"{_span([r['sys_ms_median'] for r in rs], '{:.0f}')} ms a call")

    return [f"- {k}, {th} thread(s): 1000x750 costs {_span([r['growth_median'] for r in rs])}x the 500x375 time "
            f"(median over {rs[0]['images']} images; the highest image {max(r['growth_max'] for r in rs):.2f}x{cpu(rs)})"
            for (k, th), rs in groups.items()]


def layer_rows(runs) -> list[str]:
    groups: dict = {}
    for run in runs:
        for r in run["meanfield"]["crfrnn_layer"]:
            groups.setdefault(r["threads"], []).append(r)
    out = ["| CrfRnn, VOC kernels, 500x375, L=21, T=5 | threads | forward ms | forward / pydensecrf2 T=5 "
           "(per-image spread) | forward + backward ms | fwd+bwd / fwd (per-image spread) |", "|---|---|---|---|---|---|"]
    for th, rs in groups.items():
        def ratio(key):
            spread = (f" ({min(r[key + '_min'] for r in rs):.2f}-{max(r[key + '_max'] for r in rs):.2f})"
                      if key + "_min" in rs[0] else "")
            return _span([r[key] for r in rs]) + spread

        out.append(f"| {rs[0].get('images', 1)} image(s) | {th} | {_span([r['forward_ms'] for r in rs], '{:.0f}')} "
                   f"| **{ratio('forward_over_pydensecrf')}** "
                   f"| {_span([r['forward_backward_ms'] for r in rs], '{:.0f}')} | {ratio('fb_over_f')} |")
    mem = [run["memory"] for run in runs if "memory" in run]
    if mem:
        out.append(f"\nPeak RSS during forward + backward (fresh process): {_span([m['peak_rss_mb'] for m in mem], '{:.0f}')}"
                   f" MB ({_span([m['forward_backward_extra_mb'] for m in mem], '{:.0f}')} MB above the process after"
                   " imports).")
    return out


def folder_rows(runs) -> list[str]:
    groups: dict = {}
    for run in runs:
        for r in run["rows"]:
            groups.setdefault((r["kernels"], r["images"], r["workers"]), []).append(r)
    out = ["| folder, T=10 | images, processes | crfrnn img/s | pydensecrf2 img/s | throughput ratio | CPU-time ratio "
           "| labels agree |", "|---|---|---|---|---|---|---|"]
    for (k, n, w), rs in groups.items():
        out.append(f"| {k} | {n}, {w} | {_span([r['images_per_second']['crfrnn'] for r in rs])} "
                   f"| {_span([r['images_per_second']['pydensecrf2'] for r in rs])} "
                   f"| **{_span([r['throughput_ratio'] for r in rs])}** | {_span([r['cpu_ratio'] for r in rs])} "
                   f"| {100 * min(r['label_agreement'] for r in rs):.2f} % |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="JSON files of bench_meanfield.py / bench_folders.py runs")
    a = ap.parse_args(argv)
    docs = [json.loads(p.read_text()) for p in a.files]
    mf = [d for d in docs if "meanfield" in d]
    folders = [d for d in docs if "rows" in d]
    if mf:
        print(f"{len(mf)} run(s) of bench_meanfield\n")
        if any("densecrf" in d["meanfield"] for d in mf):
            print("\n".join(densecrf_rows([d for d in mf if "densecrf" in d["meanfield"]])), end="\n\n")
            print("\n".join(scaling_rows([d for d in mf if "densecrf" in d["meanfield"]])), end="\n\n")
        print("\n".join(layer_rows(mf)), end="\n\n")
    if folders:
        print(f"{len(folders)} run(s) of bench_folders\n")
        print("\n".join(folder_rows(folders)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
