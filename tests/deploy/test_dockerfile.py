"""The image, read statically (no Docker engine here): multi-stage, dependencies
before the source, a non-root user, the worker as PID 1, the data volume, and a
build context without .venv, var or .git."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def dockerfile_user() -> tuple[int, int]:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid or uid)


def dockerfile_volumes() -> list[str]:
    volumes: list[str] = []
    for word, args in final_stage():
        if word == "VOLUME":
            volumes += json.loads(args) if args.startswith("[") else args.split()
    return volumes


def test_multi_stage_with_a_slim_final_stage() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    final = final_stage()
    copies = [args for word, args in final if word == "COPY"]
    assert any(args.startswith("--from=") for args in copies)
    # The final stage gets no compiler or pip install of its own.
    assert not any(word == "RUN" and "pip install" in args for word, args in final)


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    build = next(s for s in stages() if any("pip install" in a for w, a in s if w == "RUN"))
    order = [(w, a) for w, a in build if w in ("COPY", "RUN")]
    deps = next(i for i, (w, a) in enumerate(order) if w == "RUN" and "requirements" in a)
    source = next(i for i, (w, a) in enumerate(order) if w == "COPY" and "stream_app" in a)
    assert deps < source
    before = " ".join(a for w, a in order[:deps] if w == "COPY")
    assert "pyproject.toml" in before
    assert "constraints.txt" in before
    assert "stream_app" not in before
    assert "-c constraints.txt" in order[deps][1]
    assert "--no-deps" in next(a for w, a in order[source:] if w == "RUN")


def test_runs_as_a_fixed_non_root_user() -> None:
    uid, gid = dockerfile_user()
    assert uid > 0
    assert gid > 0


def test_the_worker_is_pid_1_in_exec_form() -> None:
    final = final_stage()
    assert not any(w == "ENTRYPOINT" for w, _ in final), "a wrapper would be PID 1"
    (cmd,) = [json.loads(a) for w, a in final if w == "CMD"]
    assert cmd == ["stream-app", "worker"]
    stop = [a for w, a in final if w == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])


def test_the_data_directory_is_a_volume() -> None:
    env = " ".join(a for w, a in final_stage() if w == "ENV")
    assert "STREAM_APP_DATA_DIR=/var/lib/stream-app" in env
    assert "/var/lib/stream-app" in dockerfile_volumes()


def test_copied_files_exist() -> None:
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from="):
            for source in shlex.split(args)[:-1]:
                assert (ROOT / source).exists(), source


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
            if pattern.startswith("/", i):
                parts[-1] = "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def excluded(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or
    any of its parent directories; `!` re-includes."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _dockerignore_regex(pattern.strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv",
        ".venv/bin/python",
        "var",
        "var/stream-app/x/0/CURRENT",
        ".git",
        ".git/HEAD",
        "tests/conftest.py",
        ".pytest_cache",
        "stream_app/__pycache__/cli.cpython-311.pyc",
        "build/lib/x.py",
        "deploy/base/kustomization.yaml",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert excluded(path)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from="):
            for source in shlex.split(args)[:-1]:
                assert not excluded(source), source
    for source in (ROOT / "stream_app").rglob("*.py"):
        assert not excluded(source.relative_to(ROOT).as_posix()), source


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
