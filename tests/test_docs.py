"""The commands README.md and docs/*.md show are commands that work: every fenced shell block is
parsed, and for each command its program is one we know, every `python -m pbp_hpc.X` module runs
with --help and accepts every flag the docs give it, every `--set` key is a configuration key, every
file named (configs/, jobs/, slurm/, benchmarks/) exists, every sweep file expands into its points
and every `make` target is in the Makefile. Placeholders (DIR, JOBFILE, X.yaml, <...>) are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
from unittest import mock
from pathlib import Path

import pytest

from pbp_hpc import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:sh|bash|shell|console)[^\n]*\n(.*?)^```", re.S | re.M)
# Programs the docs may run besides python/mpiexec/make/sbatch/srun (checked below): the shell's and
# Slurm's own, and the ones a cluster's set-up uses.
OTHER_PROGRAMS = {".", "source", "bash", "cd", "ls", "cat", "export", "module", "pip", "sinfo", "squeue", "sacct",
                  "scancel", "scontrol", "nvidia-smi", "time", "timeout"}
LAUNCHERS = {"mpiexec", "mpirun", "srun"}
FILE = re.compile(r"^(?:\.\./)?((?:configs|jobs|slurm|benchmarks|docs)/[\w./-]+\.(?:yaml|sh|py|md))$")


def _placeholder(token: str) -> bool:
    """DIR, JOBFILE, jobs/X.yaml, <jobid>, results/*.h5: an example's blanks, not a name to check."""
    return bool(re.search(r"[<>*]|(?:^|/)[A-Z][A-Z_0-9]*(?:\.\w+)?$", token))


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command in a fenced shell block, continuation lines joined, comments
    and leading VAR=value assignments dropped, `a; b` and `a && b` split."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                tokens = shlex.split(line.replace(";", " ; ").replace("&&", " ; "), comments=True)
                argv: list[str] = []
                for tok in tokens + [";"]:
                    if tok == ";":
                        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                            argv.pop(0)
                        if argv:
                            found.append((f"{doc.name}: {line.strip()[:80]}", argv))
                        argv = []
                    else:
                        argv.append(tok)
    return found


@functools.lru_cache(maxsize=None)
def module_help(module: str) -> str:
    """`python -m MODULE --help`, run in this process (runpy; a subprocess each would cost seconds)."""
    out = io.StringIO()
    with mock.patch.object(sys, "argv", [module, "--help"]), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert info.value.code in (0, None), f"python -m {module} --help exited {info.value.code}"
    return out.getvalue()


def _python_args(argv: list[str]) -> list[str] | None:
    """The `python ...` part of a command (after a launcher and its options), or None."""
    for i, tok in enumerate(argv):
        if tok in ("python", "python3") or tok.endswith("/python"):
            return argv[i + 1:]
    return None


def _check_config_key(key: str) -> None:
    section: type = config.Config
    for part in key.split("."):
        fields = getattr(section, "model_fields", {})
        assert part in fields, f"--set {key}: no configuration key {key!r}"
        section = fields[part].annotation


def _check_python(where: str, args: list[str]) -> None:
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module in ("venv", "pip"):  # a virtual environment's set-up
            return
        if module == "pytest":
            for tok in rest:
                if tok.startswith("tests/"):
                    assert (ROOT / tok.split("::")[0]).is_file(), f"{where}: {tok} does not exist"
            return
        assert module.startswith("pbp_hpc"), f"{where}: python -m {module}"
        if "--" in rest:  # a wrapper's own options, then the command it runs (python -m pbp_hpc.elastic -- ...)
            inner, rest = rest[rest.index("--") + 1:], rest[:rest.index("--")]
            inner_args = _python_args(inner)
            if inner_args is not None:
                _check_python(where, inner_args)
        helptext = module_help(module)
        for i, tok in enumerate(rest):
            if tok.startswith("--"):
                flag = tok.split("=")[0]
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), f"{where}: {module} has no {flag}"
            if i and rest[i - 1] == "--set":
                _check_config_key(tok.split("=")[0])
        if module == "pbp_hpc.sweep" and rest and not _placeholder(rest[0]):
            from pbp_hpc.sweep import expand
            assert expand(ROOT / rest[0]).points, f"{where}: {rest[0]} has no points"
    else:
        assert args and (ROOT / args[0]).is_file(), f"{where}: python {args[:1]}: no such script"


def test_every_documented_command_names_what_exists():
    cmds = commands()
    assert len(cmds) > 40, "the fenced shell blocks were not found"
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for where, argv in cmds:
        program = argv[0]
        for tok in argv:
            m = FILE.match(tok.split("=", 1)[-1])
            if m and not _placeholder(m.group(1)):
                assert (ROOT / m.group(1)).is_file(), f"{where}: {m.group(1)} does not exist"
        if program == "make":
            assert all(t in targets or "=" in t for t in argv[1:]), f"{where}: not a Makefile target"
        elif program in LAUNCHERS or program in ("python", "python3"):
            args = _python_args(argv)
            if args is not None:
                _check_python(where, args)
        elif program == "sbatch":
            assert any(FILE.match(t) for t in argv), f"{where}: sbatch without a slurm/ script"
        elif FILE.match(program):
            continue  # a script of the repository, checked above
        else:
            assert program in OTHER_PROGRAMS, f"{where}: unknown program {program!r} (add it to OTHER_PROGRAMS if meant)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_link_to_files_that_exist(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if not re.match(r"^[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name}: link to {target}, which does not exist"


def test_readme_is_a_first_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first = commands()[:2]
    assert [argv for _, argv in first] == [["make", "run"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_what_runs_write_is_ignored_by_git():
    """README: results, figures, plots, tables, checkpoints, logs and models stay out of `git status`."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["results/strong_scaling.h5", "results/slurm_smoke/logs/x/pbp-sweep-1_0.out", "figures/speedup.png",
               "plots/tta/a.png", "tables/tpe.csv", "checkpoints/7.h5", "checkpoints/7.model.h5", "model.h5",
               "logs/pbp-train-7.out", "logs/pbp-sweep-7_1.out"]
    p = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(p.stdout.split()) == sorted(written), p.stdout + p.stderr
    kept = subprocess.run(["git", "check-ignore", "--no-index", "logs/.gitignore"], cwd=ROOT, capture_output=True, text=True)
    assert kept.returncode == 1, kept.stdout  # the folder itself is in the repository
