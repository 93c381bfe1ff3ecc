"""The launch command of an elastic run, and the same command for the ranks and hosts that are left.

`mpiexec -n P [-hosts H1,H2 -ppn K] python -m pbp_hpc.train ARGS` (MPICH's Hydra; mpirun alike) or
`srun [-N N] [-n P] [--ntasks-per-node K] [-w LIST] [-x LIST] python -m pbp_hpc.train ARGS`.
After a loss the rank count and the host lists are rewritten: one fewer rank where a rank died,
the hosts left where a host was lost (or, with -hosts/-ppn or --ntasks-per-node, where the rank
that died was on it), `--set parallel.ranks=` follows the new count and `--resume` is added.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from pbp_hpc.errors import ConfigError

HYDRA = ("mpiexec", "mpirun", "mpiexec.hydra")
SRUN = ("srun",)
TRAIN = "pbp_hpc.train"

# option spellings: (launcher kind, what) -> names
_OPTIONS = {
    ("hydra", "ranks"): ("-n", "-np"),
    ("hydra", "hosts"): ("-hosts", "-host", "--hosts", "--host"),
    ("hydra", "per_node"): ("-ppn", "--ppn"),
    ("srun", "ranks"): ("-n", "--ntasks"),
    ("srun", "nodes"): ("-N", "--nodes"),
    ("srun", "per_node"): ("--ntasks-per-node",),
    ("srun", "nodelist"): ("-w", "--nodelist"),
    ("srun", "exclude"): ("-x", "--exclude"),
}


@dataclass
class Launch:
    """A parsed launch: the launcher's tokens, the program (python -m pbp_hpc.train) and its arguments."""

    kind: str  # "hydra" or "srun"
    launcher: list[str]
    program: list[str]  # [python, "-m", "pbp_hpc.train"]
    args: list[str]
    lost_hosts: list[str] = field(default_factory=list)  # srun: excluded from now on

    def argv(self) -> list[str]:
        return [*self.launcher, *self.program, *self.args]

    def get(self, what: str) -> Optional[str]:
        return _find(self.launcher, _OPTIONS.get((self.kind, what), ()))[1]

    def set(self, what: str, value: Optional[str]) -> None:
        self.launcher = _put(self.launcher, _OPTIONS[(self.kind, what)], value)

    def ranks(self) -> Optional[int]:
        value = self.get("ranks")
        if value is None and self.kind == "srun" and self.get("nodes") and self.get("per_node"):
            return _int(self.get("nodes"), "-N") * _int(self.get("per_node"), "--ntasks-per-node")
        return None if value is None else _int(value, "-n")

    def hosts(self) -> Optional[list[str]]:
        """Hydra: the -hosts list (names only, ':slots' dropped); srun: the --nodelist, if given."""
        value = self.get("hosts" if self.kind == "hydra" else "nodelist")
        return None if value is None else [h.split(":")[0] for h in value.split(",") if h]


def _int(value: Optional[str], name: str) -> int:
    try:
        n = int(value or "")
    except ValueError:
        raise ConfigError(f"elastic: launcher option {name} is {value!r}, not a whole number") from None
    if n < 1:
        raise ConfigError(f"elastic: launcher option {name} is {n}; it must be at least 1")
    return n


def _find(tokens: list[str], names: tuple[str, ...]) -> tuple[Optional[int], Optional[str]]:
    """(index, value) of the last of `names` in tokens: `-n 4`, `--ntasks=4`, `-n4` (one-letter options)."""
    found: tuple[Optional[int], Optional[str]] = (None, None)
    i = 1
    while i < len(tokens):
        t = tokens[i]
        for name in names:
            if t == name and i + 1 < len(tokens):
                found = (i, tokens[i + 1])
                i += 1
                break
            if t.startswith(name + "=") and name.startswith("--"):
                found = (i, t[len(name) + 1 :])
                break
            if len(name) == 2 and t.startswith(name) and len(t) > 2 and t[2:].isdigit():
                found = (i, t[2:])
                break
        i += 1
    return found


def _put(tokens: list[str], names: tuple[str, ...], value: Optional[str]) -> list[str]:
    """tokens with option `names` set to value (removed when None; appended after the launcher's name if absent)."""
    out = list(tokens)
    i, _ = _find(out, names)
    while i is not None:  # drop every occurrence, then add one
        width = 2 if out[i] in names else 1
        del out[i : i + width]
        i, _ = _find(out, names)
    if value is not None:
        name = names[0]
        out[1:1] = [f"{name}={value}"] if name.startswith("--") else [name, value]
    return out


def parse(argv: list[str]) -> Launch:
    """Split `LAUNCHER ... python -m pbp_hpc.train ARGS`; a clear error for anything else."""
    if not argv:
        raise ConfigError("elastic: no command given; usage: python -m pbp_hpc.elastic [options] -- mpiexec -n P python -m pbp_hpc.train ...")
    name = os.path.basename(argv[0])
    kind = "hydra" if name in HYDRA else "srun" if name in SRUN else None
    if kind is None:
        raise ConfigError(f"elastic: the command must start with mpiexec, mpirun or srun, not {argv[0]!r}")
    try:
        at = next(i for i in range(1, len(argv) - 1) if argv[i] == "-m" and argv[i + 1] == TRAIN)
    except StopIteration:
        raise ConfigError(f"elastic: the command must run `python -m {TRAIN}`; found none in {' '.join(argv)[:200]!r}") from None
    launcher, program, args = argv[: at - 1], argv[at - 1 : at + 2], argv[at + 2 :]
    if ":" in launcher or ":" in args:
        raise ConfigError("elastic: an MPMD launch (`:`) cannot be resized; give one program")
    launch = Launch(kind, launcher, program, args)
    if launch.ranks() is None:
        raise ConfigError(f"elastic: give the rank count to the launcher ({'-n P' if kind == 'hydra' else '-n P, or -N and --ntasks-per-node'})")
    return launch


def shrunk(launch: Launch, lost_ranks: list[int], lost_hosts: list[str], where: list[dict]) -> tuple[Launch, int]:
    """The launch for what is left: without lost_hosts (and, where the launch places ranks per
    host -- Hydra's -hosts, srun's --ntasks-per-node -- the hosts of lost_ranks), else with
    len(lost_ranks) fewer ranks (at least one fewer). where: each rank's {"host", "node"} as the run
    reported them (may be empty). Returns it and its rank count (0: nothing is left)."""
    new = Launch(launch.kind, list(launch.launcher), list(launch.program), list(launch.args), list(launch.lost_hosts))
    P, per_node = ranks_of(launch), launch.get("per_node")
    host_of = [w.get("node") or w.get("host") for w in where]
    per_host = launch.hosts() is not None if launch.kind == "hydra" else per_node is not None
    gone = list(dict.fromkeys(lost_hosts))
    if per_host:
        gone += [h for r in lost_ranks if r < len(host_of) and (h := host_of[r]) and h not in gone]
    n = P - max(1, len(lost_ranks))
    if gone:
        left = sorted({h for h in host_of if h and h not in gone})
        if launch.kind == "hydra" and launch.hosts() is not None:
            kept = [h for h in (launch.get("hosts") or "").split(",") if h and h.split(":")[0] not in gone]
            new.set("hosts", ",".join(kept))
            left = [h.split(":")[0] for h in kept]
        elif launch.kind == "srun":
            new.lost_hosts += [h for h in gone if h not in new.lost_hosts]
            new.set("exclude", ",".join(new.lost_hosts))
            listed = launch.hosts()
            if listed is not None:
                new.set("nodelist", ",".join(h for h in listed if h not in gone))
            nodes = launch.get("nodes")
            if nodes is not None:
                new.set("nodes", str(max(1, _int(nodes, "-N") - len(gone))))
        if per_node is not None:
            n = _int(per_node, "per node") * len(left)
        else:
            n = P - max(1, len(lost_ranks), sum(1 for h in host_of if h in gone))
    n = max(n, 0)
    if not (launch.kind == "srun" and launch.get("ranks") is None):  # srun -N x --ntasks-per-node: no -n
        new.set("ranks", str(n))
    nodes = new.get("nodes") if launch.kind == "srun" else None
    if nodes is not None and 1 <= n < _int(nodes, "-N"):
        new.set("nodes", str(n))
    new.args = with_ranks(new.args, n)
    return new, n


def with_ranks(args: list[str], n: int) -> list[str]:
    """Train arguments for n ranks: `--set parallel.ranks=` (if given) follows, `--resume` added once."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--set" and i + 1 < len(args) and args[i + 1].replace(" ", "").startswith("parallel.ranks="):
            out += ["--set", f"parallel.ranks={n}"]
            i += 2
            continue
        if a.startswith("--set=parallel.ranks="):
            out.append(f"--set=parallel.ranks={n}")
            i += 1
            continue
        out.append(a)
        i += 1
    if "--resume" not in out:
        out.append("--resume")
    return out


def ranks_of(launch: Launch) -> int:
    return launch.ranks() or 1
