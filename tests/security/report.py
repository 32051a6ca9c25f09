"""Summarise the reports of `make fuzz` (fuzz/out/*.json) as Markdown, for docs/SECURITY-SECTION.md.

    python tests/security/report.py fuzz/out
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(d: Path, name: str):
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else None


def render(d: Path) -> str:
    out = []
    c = _load(d, "campaign.json")
    if c:
        out += [f"Tamper campaign ({c['date']}, {c['trials']} trials per artifact, seed {c['seed']}):", "",
                "| artifact | trials | rejected | benign (no semantic change) | accepted | crashes |", "|---|---:|---:|---:|---:|---:|"]
        for r in c["rows"]:
            out.append(f"| {r['artifact']} | {r['trials']} | {r['rejected']} | {r['benign']} | {r['accepted']} | {r['crashes']} |")
        tot = {k: sum(r[k] for r in c["rows"]) for k in ("trials", "rejected", "benign", "accepted", "crashes")}
        out.append(f"| **total** | {tot['trials']} | {tot['rejected']} | {tot['benign']} | {tot['accepted']} | {tot['crashes']} |")
        whys = {}
        for r in c["rows"]:
            for why, n in r["benign_why"].items():
                whys.setdefault(why, []).append(f"{r['artifact']} {n}")
        if whys:
            out += ["", "Benign trials, by reason:"]
            out += [f"- {why}: {', '.join(where)}" for why, where in whys.items()]
        if c.get("problems"):
            out += ["", "Problems: " + "; ".join(c["problems"])]
        out.append("")
    ld = _load(d, "load.json")
    if ld:
        out += [f"Key broker load ({ld['date']}): {ld['concurrency']} concurrent clients for {ld['seconds']} s: "
                f"{ld['requests']} key releases, {ld['errors']} errors, {ld['throughput_per_s']}/s, latency p50 {ld['p50_ms']} ms, "
                f"p90 {ld['p90_ms']} ms, p99 {ld['p99_ms']} ms; /v1/health {ld['health_after']} afterwards; one audit line per "
                f"grant: {ld['audit_matches_grants']}; nonces unique: {ld['nonces_unique']}.", ""]
    cr = _load(d, "crashes.json")
    if cr:
        k, b = cr["predict"], cr["broker"]
        out += [f"Crashes ({cr['date']}): predict killed with SIGKILL {k['kills']} times (clean run {k['clean_run_seconds']} s): "
                f"nothing written {k['left_nothing']}, some results {k['left_some_results']}, all results {k['left_all_results']}, "
                f"partial or wrong results {len(k['problems'])}, temporaries left {k['temporaries_left']}. Key broker killed "
                f"{b['restarts']} times under load and restarted: {b['grants_seen_by_clients']} grants seen, grants without an "
                f"audit line {b['grants_without_audit_line']}, torn audit lines {b['audit_torn_lines']}, nonces issued twice "
                f"{b['nonces_issued_twice']}, granted twice {b['nonces_granted_twice']}, pre-restart requests replayed: "
                f"{b['replayed_after_restart']}.", ""]
    fz = _load(d, "fuzz-report.json")
    if fz:
        out += [f"atheris ({fz['date']}, {fz['seconds']:.0f} s in total):", "",
                "| harness | seconds | executions | coverage (edges) | corpus | crashes |", "|---|---:|---:|---:|---:|---:|"]
        for r in fz["rows"]:
            out.append(f"| {r['harness']} | {r['seconds']} | {r['execs']} | {r['cov']} | {r['corpus']} | {r['crashes']} |")
        out.append(f"| **total** | {sum(r['seconds'] for r in fz['rows'])} | {sum(r['execs'] for r in fz['rows'])} | | | "
                   f"{sum(r['crashes'] for r in fz['rows'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/out")))
