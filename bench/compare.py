"""Before and after a change, in one run: this checkout's server against another commit's, case by case.

    python -m bench.compare REV [--seconds 5] [--repeats 3] [--fail-below 0.95] [--tracing]

REV (a commit, tag or branch) is checked out into a temporary git worktree. Both servers run from this virtual
environment on this checkout's model store, side by side, each with WORKERS workers, and every case (model, body,
route, connections) runs on one and then at once on the other, alternating which goes first, ``--repeats`` times.
This machine's speed drifts by tens of percent within minutes, so only ratios of neighbouring runs mean anything: the
report gives each case's median throughput and p50 on both sides and after/before, and exits 1 when a ratio is below
``--fail-below`` (given), so a refactor can show it made no case slower. ``--tracing`` runs both servers with every
request traced, exported over OTLP/HTTP to a receiver in this process, so a change to tracing shows its cost.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.__main__ import bench_images
from bench.load import Wrk
from service.settings import Settings
from service.verification import cpu
from tests.helpers import GunicornServer, encode, pattern

REPO = Path(__file__).resolve().parent.parent


def cases() -> list[dict]:
    """Small images at 1, 8 and 32 connections on both models, a photo, and a /v2 inference with a BYTES tensor."""
    jpeg = encode(pattern(32, 32, seed=2), "JPEG", quality=90)
    png = encode(pattern(32, 32, seed=2), "PNG")
    photo, _ = bench_images()["1920x1080 JPEG"]  # the photo make bench sends
    v2 = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                 "data": [base64.b64encode(png).decode()]}]}).encode()
    found = [{"name": f"lenet 32x32 JPEG c={c}", "path": "/v1/models/lenet/classify", "body": jpeg,
              "type": "image/jpeg", "connections": c} for c in (1, 8, 32)]
    found += [{"name": f"convnet 32x32 PNG c={c}", "path": "/v1/models/convnet/classify", "body": png,
               "type": "image/png", "connections": c} for c in (1, 8, 32)]
    found.append({"name": "convnet 1920x1080 JPEG c=8", "path": "/v1/models/convnet/classify", "body": photo,
                  "type": "image/jpeg", "connections": 8})
    found.append({"name": "convnet /v2 infer BYTES c=8", "path": "/v2/models/convnet/infer", "body": v2,
                  "type": "application/json", "connections": 8})
    return found


def checkout(rev: str, folder: Path) -> str:
    """``rev`` as a detached worktree in ``folder``; its full commit hash."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(folder), commit], cwd=REPO, check=True)
    return commit


def compare(rev: str, seconds: float, repeats: int, workers: int, only: str = "", tracing: bool = False,
            settings: dict | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="convserve-compare-"))
    before_code = work / "before-code"
    commit = checkout(rev, before_code)
    wrk = Wrk(work)
    servers = {}
    receiver = None
    settings = dict(settings or {})
    if tracing:
        from tests.otlp import OtlpHttpReceiver

        receiver = OtlpHttpReceiver(decode=False)
        settings["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    try:
        for side, code in (("before", before_code), ("after", REPO)):
            (work / side).mkdir()
            servers[side] = GunicornServer(work / side, code=code, WORKERS=workers, MODEL_STORE=REPO / "model_store",
                                           **settings)
        for server in servers.values():
            server.wait_ready()
        results = []
        for case in (case for case in cases() if only in case["name"]):
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for repeat in range(repeats):
                for side in (("before", "after") if repeat % 2 == 0 else ("after", "before")):
                    runs[side].append(wrk.run(servers[side].url + case["path"], case["body"], case["type"],
                                              case["connections"], seconds))
            medians = {side: {"req_per_s": round(statistics.median(r["req_per_s"] for r in side_runs), 1),
                              "p50_ms": round(statistics.median(r["p50_ms"] for r in side_runs), 3),
                              "non_2xx": sum(r["non_2xx"] for r in side_runs)}
                       for side, side_runs in runs.items()}
            ratio = round(medians["after"]["req_per_s"] / medians["before"]["req_per_s"], 3)
            results.append({"case": case["name"], **medians, "after_over_before": ratio,
                            "runs": {side: [r["req_per_s"] for r in side_runs] for side, side_runs in runs.items()}})
            print(f"  {case['name']:28s} before {medians['before']['req_per_s']:7.1f} req/s p50 "
                  f"{medians['before']['p50_ms']:6.2f} ms | after {medians['after']['req_per_s']:7.1f} req/s p50 "
                  f"{medians['after']['p50_ms']:6.2f} ms | after/before {ratio:.3f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        if receiver is not None:
            receiver.close()
        subprocess.run(["git", "worktree", "remove", "--force", str(before_code)], cwd=REPO, check=False)
    return {"before": commit, "after": "working tree", "workers": workers, "seconds": seconds, "repeats": repeats,
            "tracing": tracing, "spans_received_bytes": receiver.received_bytes if receiver else None,
            "cpu": cpu(), "cases": results, "slowest": min(r["after_over_before"] for r in results)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare against (before)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and case, alternating (default 3)")
    parser.add_argument("--workers", type=int, default=Settings().WORKERS, help="gunicorn workers on each side")
    parser.add_argument("--only", default="", help="only the cases whose name contains this, e.g. \"lenet\"")
    parser.add_argument("--fail-below", type=float, default=None, help="exit 1 if a case's after/before is lower")
    parser.add_argument("--tracing", action="store_true", help="every request traced, on both sides")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for both servers (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    report = compare(args.rev, args.seconds, args.repeats, args.workers, args.only, args.tracing,
                     dict(setting.split("=", 1) for setting in args.setting))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compare-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"slowest after/before: {report['slowest']:.3f}; wrote {path.relative_to(REPO)}")
    return 1 if args.fail_below is not None and report["slowest"] < args.fail_below else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
