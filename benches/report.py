#!/usr/bin/env python3
"""Statistics for benches/run.sh (stdlib only).

Reads RESULTS/runs.tsv, RESULTS/idle.tsv, RESULTS/machine.txt and the oha JSON files in
RESULTS/oha/, prints a Markdown report: the summary table (medians, paired differences,
ratios meshgate ÷ nginx pair) and the raw per-repetition numbers.

Usage: python3 benches/report.py RESULTS_DIR
"""

import csv
import json
import os
import statistics
import sys

PROXIES = ("nginx", "meshgate", "meshgate-power")
# oha reports requests still in flight at the end of `-z` as errors; they are not failures.
DEADLINE_ERRORS = ("aborted due to deadline", "deadline")


def load_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_machine(path):
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            out[key] = value
    return out


def percentile(oha, key):
    """A latency percentile in milliseconds (oha reports seconds)."""
    value = oha.get("latencyPercentiles", {}).get(key)
    return None if value is None else value * 1000.0


def analyse_run(row, results):
    with open(os.path.join(results, "oha", row["file"])) as f:
        oha = json.load(f)
    codes = {str(k): int(v) for k, v in oha.get("statusCodeDistribution", {}).items()}
    errors = {
        k: int(v)
        for k, v in oha.get("errorDistribution", {}).items()
        if not any(d in k.lower() for d in DEADLINE_ERRORS)
    }
    ok = codes.get("200", 0)
    elapsed = oha["summary"]["total"]
    return {
        "seq": int(row["seq"]),
        "phase": row["phase"],
        "rep": int(row["rep"]),
        "path": row["path"],
        "p50": percentile(oha, "p50"),
        "p90": percentile(oha, "p90"),
        "p99": percentile(oha, "p99"),
        "ok": ok,
        "not_ok": sum(v for k, v in codes.items() if k != "200") + sum(errors.values()),
        "codes": codes,
        "errors": errors,
        "rps": ok / elapsed if elapsed else 0.0,
        "cpu_s": int(row["cpu_ticks"]) / CLK_TCK,
        "rss_max_mib": int(row["rss_max_kib"]) / 1024.0,
        "pss_max_mib": int(row.get("pss_max_kib") or 0) / 1024.0,
        "rss_one_max_mib": int(row.get("rss_one_max_kib") or 0) / 1024.0,
        "loadavg1": row.get("loadavg1", ""),
    }


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=3):
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(mesh, nginx):
    if mesh is None or nginx is None or nginx == 0:
        return "—"
    return f"{mesh / nginx:.2f}×"


def main():
    global CLK_TCK
    results = sys.argv[1]
    machine = load_machine(os.path.join(results, "machine.txt"))
    CLK_TCK = int(machine.get("clk_tck", "100"))
    runs = [analyse_run(r, results) for r in load_tsv(os.path.join(results, "runs.tsv"))]
    idle_rows = load_tsv(os.path.join(results, "idle.tsv"))
    idle = {r["path"]: int(r["rss_idle_kib"]) / 1024.0 for r in idle_rows}
    idle_pss = {r["path"]: int(r.get("pss_idle_kib") or 0) / 1024.0 for r in idle_rows}
    idle_one = {r["path"]: int(r.get("rss_one_idle_kib") or 0) / 1024.0 for r in idle_rows}

    latency = [r for r in runs if r["phase"] == "latency"]
    saturation = [r for r in runs if r["phase"] == "saturation"]

    # Paired differences: each proxied latency run minus the direct run next to it (same rep).
    by_seq = {r["seq"]: r for r in latency}
    for r in latency:
        if r["path"] == "direct":
            continue
        for s in (r["seq"] - 1, r["seq"] + 1):
            d = by_seq.get(s)
            if d is not None and d["path"] == "direct" and d["rep"] == r["rep"]:
                r["pair"] = d
                for k in ("p50", "p90", "p99"):
                    r["added_" + k] = r[k] - d[k]
                break

    for r in saturation:
        r["cpu_per_1k"] = r["cpu_s"] / (r["ok"] / 1000.0) if r["ok"] and r["path"] != "direct" else None

    def m(rows, path, key):
        return med(r.get(key) for r in rows if r["path"] == path)

    def cols(rows_, key, direct=True):
        return (m(rows_, "direct", key) if direct else None,
                m(rows_, "nginx", key), m(rows_, "meshgate", key), m(rows_, "meshgate-power", key))

    rows = []
    for label in ("p50", "p90", "p99"):
        rows.append((f"latency {label} at {RATE} rps (ms)",) + cols(latency, label))
    for label in ("p50", "p90", "p99"):
        rows.append((f"**added latency {label}** (ms, paired)",) + cols(latency, "added_" + label, False))
    rows.append(("**max rps** (unthrottled, %s conns)" % SAT_CONNS,) + cols(saturation, "rps"))
    rows.append(("**CPU-s per 1000 req** at saturation (proxies)",) + cols(saturation, "cpu_per_1k", False))
    rows.append(("RSS idle (MiB, sum of the proxies)", None, idle.get("nginx"), idle.get("meshgate"),
                 idle.get("meshgate-power")))
    rows.append(("**RSS under load** (MiB, max, sum of the proxies)",) + cols(saturation, "rss_max_mib", False))
    rows.append(("**RSS under load, one gateway** (MiB, max of either)", None, None,
                 m(saturation, "meshgate", "rss_one_max_mib"), m(saturation, "meshgate-power", "rss_one_max_mib")))
    rows.append(("PSS idle (MiB, proxies)", None, idle_pss.get("nginx"), idle_pss.get("meshgate"),
                 idle_pss.get("meshgate-power")))
    rows.append(("PSS under load (MiB, max, proxies)",) + cols(saturation, "pss_max_mib", False))

    out = []
    w = out.append
    w(f"## meshgate benchmark — {machine.get('date_utc', '?')}")
    w("")
    w(f"- machine: {machine.get('nproc')} cores, {machine.get('cpu')}, kernel {machine.get('kernel')}")
    w(f"- load average at start {machine.get('loadavg_start')}, at end {machine.get('loadavg_end')}")
    w(f"- {machine.get('mode')}; nginx {machine.get('nginx')}; {machine.get('oha')}; meshgate {machine.get('meshgate')}")
    w("")
    w("Medians over the repetitions. \"added\" = proxied run minus the adjacent direct run, "
      "paired per repetition, then the median. Ratio = meshgate ÷ nginx pair (below 1× is "
      "better for meshgate, except max rps where above 1× is better).")
    w("")
    w("| figure | direct | nginx pair | meshgate (process) | meshgate (power) | process ÷ nginx | power ÷ nginx |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for label, d, n, mg, mp in rows:
        w(f"| {label} | {fmt(d)} | {fmt(n)} | {fmt(mg)} | {fmt(mp)} | {ratio(mg, n)} | {ratio(mp, n)} |")
    w("")

    w("### Raw: latency runs (fixed rate)")
    w("")
    w("| seq | rep | path | p50 ms | p90 ms | p99 ms | added p50 | added p90 | added p99 | rps | non-200/errors | load1 |")
    w("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in latency:
        w(f"| {r['seq']} | {r['rep']} | {r['path']} | {fmt(r['p50'])} | {fmt(r['p90'])} | {fmt(r['p99'])} | "
          f"{fmt(r.get('added_p50'))} | {fmt(r.get('added_p90'))} | {fmt(r.get('added_p99'))} | "
          f"{fmt(r['rps'], 0)} | {r['not_ok']} | {r['loadavg1']} |")
    w("")
    w("### Raw: saturation runs (unthrottled)")
    w("")
    w("| seq | rep | path | rps (200s) | responses | proxy CPU-s | CPU-s / 1000 req | RSS max MiB | PSS max MiB | non-200/errors | load1 |")
    w("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in saturation:
        w(f"| {r['seq']} | {r['rep']} | {r['path']} | {fmt(r['rps'], 0)} | {r['ok']} | "
          f"{fmt(r['cpu_s'], 2) if r['path'] != 'direct' else '—'} | {fmt(r.get('cpu_per_1k'))} | "
          f"{fmt(r['rss_max_mib'], 1) if r['path'] != 'direct' else '—'} | "
          f"{fmt(r['pss_max_mib'], 1) if r['path'] != 'direct' else '—'} | {r['not_ok']} | {r['loadavg1']} |")
    w("")
    w(f"Idle (after warm-up): nginx pair RSS {fmt(idle.get('nginx'), 1)} MiB / PSS "
      f"{fmt(idle_pss.get('nginx'), 1)} MiB (2 masters + workers), meshgate pair RSS "
      f"{fmt(idle.get('meshgate'), 1)} MiB / PSS {fmt(idle_pss.get('meshgate'), 1)} MiB (2 processes; "
      f"the larger one {fmt(idle_one.get('meshgate'), 1)} MiB).")
    stages = os.path.join(results, "stages.md")
    if os.path.exists(stages):
        w("")
        w("### Where a request's time goes (stage counters of the gateways, whole run)")
        w("")
        with open(stages) as f:
            w(f.read().rstrip())

    bad = [r for r in runs if r["not_ok"]]
    if bad:
        w("")
        w("**Warning: runs with non-200 responses or errors:**")
        for r in bad:
            w(f"- seq {r['seq']} {r['phase']} {r['path']}: codes {r['codes']}, errors {r['errors']}")
    print("\n".join(out))


RATE = int(os.environ.get("BENCH_RATE", "1000"))
SAT_CONNS = int(os.environ.get("BENCH_SAT_CONNS", "64"))
CLK_TCK = 100

if __name__ == "__main__":
    main()
