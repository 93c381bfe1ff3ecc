"""python -m pbp_hpc.elastic [--min-ranks K] [--max-restarts R] -- LAUNCH python -m pbp_hpc.train ARGS

Runs the launch; when it ends because a rank or a node was lost (failures.classify), runs it
again from the last checkpoint (`--resume`) on the ranks and hosts that are left
(command.shrunk), until it finishes, fewer than K ranks remain, or R restarts are used. Each
restart is logged on stderr; with train's --json the one JSON object on stdout is the last
attempt's, with `restarts`, `lost_s` and `elastic` (every event) added.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pbp_hpc import checkpoint, config, resume
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.elastic import command, failures
from pbp_hpc.errors import ConfigError
from pbp_hpc.sweep.process import Stop, _die_with_parent


def log(msg: str) -> None:
    print(f"pbp_hpc.elastic: {msg}", file=sys.stderr, flush=True)


class Attempt:
    """One run of the launch: its output pumped through line by line and kept for classification
    (Hydra prints a dead rank's notice on stdout), and when training began (train's
    PBP_HPC_ELASTIC line). With train's --json, stdout is kept for the one JSON result: every
    other line of it goes to stderr."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.t0 = time.time()
        self.began: Optional[float] = None  # when train's elastic line came: start-up over
        self.err: list[str] = []
        self.json: Optional[str] = None
        self.clean_stdout = "--json" in argv
        self.first_dead: list[int] = []  # the rank(s) seen to end first, on this host (watch)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     bufsize=1, preexec_fn=_die_with_parent)
        self.pumps = [threading.Thread(target=self._stderr, daemon=True), threading.Thread(target=self._stdout, daemon=True)]
        for t in self.pumps:
            t.start()

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith(failures.WHERE_TAG) and self.began is None:
                self.began = time.time()
                self.watch(failures.reported(line).get("ranks", []))
            self.err.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    def _stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.lstrip().startswith("{"):
                self.json = line.strip()  # the result: printed once, with the elastic record, at the end
                continue
            self.err.append(line)
            out = sys.stderr if self.clean_stdout else sys.stdout
            out.write(line)
            out.flush()

    def watch(self, where: list[dict[str, Any]]) -> None:
        """Watch this host's ranks (pidfds): the first to end is the one lost. Hydra then kills the
        others within milliseconds, and its notice names whichever process it reaped first, not
        necessarily the one that died (seen here: the rank before it)."""
        host = socket.gethostname()
        fds, gone = {}, []
        for r, w in enumerate(where):
            if w.get("host") in (host, host.split(".")[0]) and hasattr(os, "pidfd_open"):
                try:
                    fds[os.pidfd_open(int(w["pid"]))] = r
                except ProcessLookupError:  # ended (and reaped) before the watch began: the first lost
                    gone.append(r)
                except OSError:  # not ours to watch
                    pass
        if gone:
            self.first_dead = gone
            for fd in fds:
                os.close(fd)
        elif fds:
            threading.Thread(target=self._watch, args=(fds,), daemon=True).start()

    def _watch(self, fds: dict[int, int]) -> None:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll()  # blocks until a rank ends (or the attempt does: every fd then)
            if len(ready) < len(fds) or len(fds) == 1:  # not all at once: the first are the lost
                self.first_dead = sorted(fds[fd] for fd, _ in ready)
        finally:
            for fd in fds:
                os.close(fd)

    def wait(self) -> int:
        code = self.proc.wait()
        for t in self.pumps:
            t.join(timeout=30)
        return code

    def output(self) -> str:
        """What the attempt printed, but its JSON result."""
        return "".join(self.err)


def checkpoint_of(launch: command.Launch) -> tuple[Path, config.Config]:
    """Where the run checkpoints (its config, read as train reads it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--data-dir")
    known, _ = p.parse_known_args(launch.args)
    overrides = list(known.overrides) + ([f"data.dir={known.data_dir}"] if known.data_dir else [])
    cfg = config.load(known.config, overrides)
    return resume.checkpoint_path(cfg), cfg


def position(path: Path) -> dict[str, Any]:
    """The checkpoint at path: where it resumes, when it was written, whether it reads (every field checked)."""
    if not path.exists():
        return {"path": str(path), "exists": False}
    try:
        ck = checkpoint.load(path)
        return {"path": str(path), "exists": True, "valid": True, "epoch": ck["epoch"], "step": ck["step"],
                "written_at": path.stat().st_mtime, "ranks": ck["meta"].get("ranks")}
    except CheckpointError as exc:
        return {"path": str(path), "exists": True, "valid": False, "error": str(exc)}


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        raise ConfigError("elastic: put the launch command after `--`: python -m pbp_hpc.elastic [options] -- mpiexec -n P python -m pbp_hpc.train ...")
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.elastic", description=__doc__.split("\n\n")[0],
                                usage="python -m pbp_hpc.elastic [--min-ranks K] [--max-restarts R] -- LAUNCH COMMAND")
    p.add_argument("--min-ranks", type=int, default=1, help="stop when fewer ranks than this are left (default 1)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts at most (default 3)")
    args = p.parse_args(argv[:cut])
    if args.min_ranks < 1 or args.max_restarts < 0:
        raise ConfigError("elastic: --min-ranks must be at least 1 and --max-restarts at least 0")
    return args, argv[cut + 1 :]


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args, cmd = parse_args(argv)
        launch = command.parse(cmd)
        path, cfg = checkpoint_of(launch)
    except ConfigError as exc:
        print(f"pbp_hpc.elastic: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not resume.periodic(cfg):
        log("warning: no checkpoint.every_steps/every_seconds/every_epochs: a restart redoes the run from its start")
    stop = Stop()
    stop.install()
    return run(launch, path, args.min_ranks, args.max_restarts, stop)


def run(launch: command.Launch, path: Path, min_ranks: int, max_restarts: int, stop: Stop) -> int:
    env = {**os.environ, "PBP_HPC_ELASTIC": "1"}
    events: list[dict[str, Any]] = []
    ranks = command.ranks_of(launch)
    last_fail: Optional[float] = None
    while True:
        log(f"attempt {len(events) + 1} on {ranks} rank(s): {' '.join(launch.argv())}")
        att = Attempt(launch.argv(), env)
        stop.child = att.proc
        stop.forward()
        code = att.wait()
        stop.child = None
        t_end = time.time()
        if events and last_fail is not None:  # the previous restart's cost: failure -> training again
            events[-1]["restart_s"] = (att.began or t_end) - last_fail
        where = failures.reported(att.output()).get("ranks", [])
        end = failures.classify(code, att.output(), where, signalled=stop.requested, first_dead=att.first_dead)
        if end.kind == "finished":
            return finish(att, events, ranks, "finished", code)
        ck = position(path)
        event = {"attempt": len(events) + 1, "ranks": ranks, "exit_code": code, "cause": end.cause,
                 "lost_ranks": end.ranks, "lost_hosts": end.hosts, "failed_at": t_end, "ran_s": t_end - att.t0,
                 "checkpoint": ck,
                 # work redone: what ran after the last checkpoint was written (all of the attempt without one)
                 "redone_s": t_end - max(ck.get("written_at") or att.t0, att.began or att.t0), "restart_s": None}
        events.append(event)
        if ck.get("exists") and not ck.get("valid"):
            log(f"the checkpoint {path} does not read ({ck['error']}); stopping")
            return finish(att, events, ranks, "checkpoint unreadable", code)
        if end.kind == "final":
            log(f"attempt {len(events)} ended: {end.cause}")
            return finish(att, events, ranks, end.cause, code)
        launch, left = command.shrunk(launch, end.ranks, end.hosts, where)
        event["ranks_after"] = left
        if left < min_ranks:
            log(f"lost {end.cause}; {left} rank(s) left, fewer than --min-ranks {min_ranks}: stopping, "
                f"the last checkpoint is kept at {path}")
            return finish(att, events, ranks, f"{left} rank(s) left, fewer than --min-ranks {min_ranks}", code)
        if len(events) > max_restarts:
            log(f"lost {end.cause}; {max_restarts} restart(s) used (--max-restarts): stopping, the last checkpoint is kept at {path}")
            return finish(att, events, ranks, f"--max-restarts {max_restarts} used", code)
        at = f"epoch {ck['epoch']} step {ck['step']}" if ck.get("valid") else "the start (no checkpoint yet)"
        log(f"restart {len(events)} of at most {max_restarts}: {end.cause} at {time.strftime('%H:%M:%S', time.localtime(t_end))}, "
            f"after {event['ran_s']:.1f} s; about {event['redone_s']:.1f} s of work redone; continuing from {at} on {left} rank(s)")
        ranks, last_fail = left, t_end


def finish(att: Attempt, events: list[dict[str, Any]], ranks: int, ended: str, code: int) -> int:
    """Print the result (the last attempt's JSON, if it gave one, with the elastic record) and return code."""
    lost = sum((e["redone_s"] or 0.0) + (e["restart_s"] or 0.0) for e in events)
    record = {"restarts": sum(1 for e in events if e.get("restart_s") is not None), "lost_s": lost,
              "elastic": {"ended": ended, "final_ranks": ranks, "events": events}}
    if events:
        log(f"{record['restarts']} restart(s), {lost:.1f} s lost (work redone and restarts); ended: {ended}")
    if att.json is not None:
        try:
            result = json.loads(att.json)
        except ValueError:
            result = None
        if isinstance(result, dict):
            result.update(record)
            print(json.dumps(result, allow_nan=False), flush=True)
            return code
        print(att.json, flush=True)
    elif code != 0 and "--json" in att.proc.args:
        print(json.dumps({"status": "failed", "error": ended, "ranks": ranks, **record}), flush=True)
    return code
