"""The measured part of docs/security.md, written from the reports of `make fuzz`.

    python fuzz/report.py fuzz/out                                  # print it
    python fuzz/report.py fuzz/out --update docs/security.md        # keep the reports, rewrite the page

With --update the reports are copied to docs/security-data/ beside the page and the text between the
page's `measured:begin` and `measured:end` markers is replaced, so the published figures are always
the last campaign's, never pasted by hand (tests/security/test_report.py checks they agree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPORTS = ("campaign.json", "load.json", "crashes.json", "fuzz-report.json", "serve-abuse.json")
BEGIN, END = "<!-- measured:begin", "<!-- measured:end -->"


def _load(d: Path, name: str):
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else None


def _campaign(c: dict) -> list[str]:
    out = [
        f"**Tamper campaign** ({c['date']}, {c['trials']} trials per artifact, seed {c['seed']}):",
        "",
        "| artifact | trials | rejected | benign (no semantic change) | accepted | crashes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in c["rows"]:
        out.append(
            f"| {r['artifact']} | {r['trials']} | {r['rejected']} | {r['benign']} | {r['accepted']} | {r['crashes']} |"
        )
    tot = {k: sum(r[k] for r in c["rows"]) for k in ("trials", "rejected", "benign", "accepted", "crashes")}
    out.append(
        f"| **total** | **{tot['trials']:,}** | **{tot['rejected']:,}** | **{tot['benign']:,}** | "
        f"**{tot['accepted']}** | **{tot['crashes']}** |"
    )
    whys: dict[str, list[str]] = {}
    for r in c["rows"]:
        for why, n in r["benign_why"].items():
            whys.setdefault(why, []).append(f"{r['artifact']} {n}")
    if whys:
        out += ["", "Benign trials, by reason:", ""]
        out += [f"- {why}: {', '.join(where)}" for why, where in whys.items()]
    if c.get("problems"):
        out += ["", "Problems: " + "; ".join(c["problems"])]
    return out + [""]


def _fuzz(fz: dict) -> list[str]:
    out = [
        f"**atheris** ({fz['date']}, {fz['seconds']:.0f} s in total):",
        "",
        "| harness | seconds | executions | coverage (edges) | corpus | crashes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in fz["rows"]:
        out.append(
            f"| {r['harness']} | {r['seconds']} | {r['execs']:,} | {r['cov']} | {r['corpus']} | {r['crashes']} |"
        )
    out.append(
        f"| **total** | **{sum(r['seconds'] for r in fz['rows'])}** | **{sum(r['execs'] for r in fz['rows']):,}** "
        f"| | | **{sum(r['crashes'] for r in fz['rows'])}** |"
    )
    return out + [""]


def _load_test(ld: dict) -> list[str]:
    return [
        f"**Key broker load** ({ld['date']}): {ld['concurrency']} concurrent clients for {ld['seconds']} s: "
        f"{ld['requests']:,} key releases, {ld['errors']} errors, {ld['throughput_per_s']} per second, latency p50 "
        f"{ld['p50_ms']} ms, p90 {ld['p90_ms']} ms, p99 {ld['p99_ms']} ms; `/v1/health` afterwards: "
        f"{ld['health_after']}; one audit line per grant: {ld['audit_matches_grants']}; nonces unique: "
        f"{ld['nonces_unique']}.",
        "",
    ]


def _crashes(cr: dict) -> list[str]:
    k, b = cr["predict"], cr["broker"]
    return [
        f"**Crashes** ({cr['date']}): predict killed with SIGKILL {k['kills']} times (clean run "
        f"{k['clean_run_seconds']} s): nothing written {k['left_nothing']}, some results {k['left_some_results']}, "
        f"all results {k['left_all_results']}, partial or wrong results {len(k['problems'])}, temporaries left "
        f"{k['temporaries_left']}. A key broker killed {b['restarts']} times under load and restarted: "
        f"{b['grants_seen_by_clients']:,} grants seen by clients, grants without an audit line "
        f"{b['grants_without_audit_line']}, torn audit lines {b['audit_torn_lines']}, nonces issued twice "
        f"{b['nonces_issued_twice']}, granted twice {b['nonces_granted_twice']}, requests replayed after a restart "
        f"and granted: {b['replayed_after_restart']}.",
        "",
    ]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _serve_abuse(sa: dict) -> list[str]:
    lim = sa["limits"]
    out = [
        f"**serve under abuse** ({sa['date']}; a native server with the manifest's stack size and allocator, "
        f"its enclave's limits: `sgx.max_threads` {lim['sgx_max_threads']}, `sgx.enclave_size` "
        f"{lim['sgx_enclave_size'] >> 20} MiB):",
        "",
        "| case | connections | server VmPeak MiB | VmRSS MiB | threads | answers after | within limits |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, c in sa["cases"].items():
        out.append(
            f"| {name} | {c['connections']} | {c['server_vm_peak'] >> 20} | {c['server_vm_rss'] >> 20} | "
            f"{c['server_threads']} | {_yes(c['answers_after'])} | {_yes(c['within_limits'])} |"
        )
    return out + [""]


def render(d: Path) -> str:
    out: list[str] = []
    for name, part in (
        ("campaign.json", _campaign),
        ("fuzz-report.json", _fuzz),
        ("load.json", _load_test),
        ("crashes.json", _crashes),
        ("serve-abuse.json", _serve_abuse),
    ):
        report = _load(d, name)
        if report:
            out += part(report)
    return "\n".join(out).rstrip("\n") + "\n"


def measured_block(page: str) -> tuple[int, int]:
    """(start, end) of the generated text between the markers of ``page``."""
    b = page.find(BEGIN)
    e = page.find(END)
    if b < 0 or e < b:
        raise SystemExit("report.py: the page has no measured:begin/measured:end markers")
    return page.index("\n", b) + 1, e


def update(page_path: Path, reports: Path) -> None:
    data = page_path.parent / "security-data"
    data.mkdir(exist_ok=True)
    for name in REPORTS:
        if (reports / name).is_file() and (reports / name).resolve() != (data / name).resolve():
            shutil.copyfile(reports / name, data / name)
    page = page_path.read_text()
    b, e = measured_block(page)
    tmp = page_path.with_suffix(".tmp")
    tmp.write_text(page[:b] + render(data) + page[e:])
    os.replace(tmp, page_path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="?", default="fuzz/out", help="directory of the JSON reports (default fuzz/out)")
    p.add_argument("--update", metavar="PAGE", help="copy the reports beside PAGE and rewrite its measured part")
    a = p.parse_args()
    if a.update:
        update(Path(a.update), Path(a.reports))
        print(f"updated {a.update} from {a.reports}")
    else:
        sys.stdout.write(render(Path(a.reports)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
