"""Write constraints.txt: the versions installed in this environment of every
package agentloop needs (with its dev and run extras), directly or not.

    .venv/bin/python scripts/freeze-constraints.py > constraints.txt
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            env_ok = any(
                req.marker is None or req.marker.evaluate({"extra": e}) for e in wanted | {""}
            )
            if not env_ok:
                continue
            key = canonical(req.name)
            if key in found:
                continue
            try:
                found[key] = f"{metadata.distribution(req.name).metadata['Name']}=="
                found[key] += metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            todo.append((req.name, set(req.extras)))
    return found


if __name__ == "__main__":
    pins = closure("agentloop", {"dev", "run"})
    print("# The versions `make test` passed with; `make install` installs with them.")
    print("# Regenerate: .venv/bin/python scripts/freeze-constraints.py > constraints.txt")
    for key in sorted(pins):
        print(pins[key])
