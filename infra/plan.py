"""`python -m infra.plan STACK`: the resource tree STACK would create, without the Pulumi CLI or cloud access.
Runs the real program under Pulumi's mocks (infra/mocks.py) and prints type, name and parent nesting."""

from __future__ import annotations

import sys
from collections import Counter

from infra.config import ConfigError
from infra.mocks import Capture, Recorded, run
from infra.policies import check_all, stack_config_violations


def tree_lines(capture: Capture) -> list[str]:
    children: dict[str | None, list[Recorded]] = {}
    for r in capture.resources:
        children.setdefault(r.parent, []).append(r)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        # Components first, then by type and name: registration order is async, this is stable for diffs.
        for r in sorted(children.get(parent, []), key=lambda r: (r.custom, r.type, r.name)):
            lines.append(f"{'  ' * depth}{'+' if r.custom else '*'} {r.type}  {r.name}")
            walk(r.urn, depth + 1)

    walk(None, 0)
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m infra.plan STACK   (aws | onprem | hybrid: Pulumi.STACK.yaml)", file=sys.stderr)
        return 2
    try:
        capture = run(argv[0])
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"stack {argv[0]}: {len(capture.resources)} resources (* component, + resource)")
    print("\n".join(tree_lines(capture)))
    counts = Counter(r.type.split(":")[0] for r in capture.resources if r.custom)
    print("by provider: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("outputs: " + ", ".join(sorted(capture.outputs)))
    violations = check_all(capture.resources) + stack_config_violations(argv[0])
    for v in violations:
        print(f"POLICY {v.policy}: {v.resource}: {v.message}")
    print(f"policies: {'all pass' if not violations else f'{len(violations)} violations'}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
