"""Real installed distributions for discovery tests, without touching the environment.

``make_dist(site, "acme-plugins", {"acme": "acme_mod:Plugin"}, {"acme_mod.py": "..."})`` writes
a module and a ``.dist-info`` (METADATA, entry_points.txt) under *site*; a process whose
``PYTHONPATH`` includes *site* finds the entry points through ``importlib.metadata`` exactly as
for a pip-installed package.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_dist(site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str],
              version: str = "1.0", requires: list[str] = ()) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    for filename, source in modules.items():
        path = site / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    extras = sorted({r.split("extra ==")[1].strip().strip("'\"") for r in requires if "extra ==" in r})
    metadata += [f"Provides-Extra: {extra}" for extra in extras]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (dist_info / "METADATA").write_text("\n".join(metadata) + "\n")
    lines = ["[authgw.plugins]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (dist_info / "RECORD").write_text("")
    return site
