#!/usr/bin/env python3
"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/rules.yml (the Prometheus Operator's form).

    python3 deploy/prometheus/make-prometheusrule.py           # regenerate after editing rules.yml
    python3 deploy/prometheus/make-prometheusrule.py --check   # exit 1 if it is out of date

Standard library only; the rule groups are copied as text, so comments and formatting survive.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
RULES = DEPLOY / "prometheus" / "rules.yml"
TARGET = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/make-prometheusrule.py: edit rules.yml, then run
#   python3 deploy/prometheus/make-prometheusrule.py
# kube-prometheus-stack selects rules by its release label by default: add `release: <name>` in an overlay.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: convserve
  labels:
    app.kubernetes.io/name: convserve
spec:
"""


def render() -> str:
    text = RULES.read_text()
    groups = text[text.index("\ngroups:") + 1:]
    return HEADER + "".join(("  " + line if line.strip() else line) for line in groups.splitlines(True))


def main(argv: list[str]) -> int:
    wanted = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != wanted:
            print(f"{TARGET} is out of date: run python3 {Path(__file__).relative_to(DEPLOY.parent)}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
