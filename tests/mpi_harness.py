"""pytest plugin for in-process MPI tests run as `mpiexec -n P python -m pytest --with-mpi ...`, P > 1.

Without it, one rank failing an assertion that the others do not reach leaves them waiting in a
collective for ever, a test that deadlocks hangs the job for ever, and every rank prints the whole
pytest output, so each line appears P times. With it, in such a run (and only there: serial runs and
`--with-mpi` under one rank are left alone):

* a failure on any rank (a test's setup, call or teardown, a collection error, an internal error)
  is printed to stderr, headed with the rank, and then the whole job is ended with MPI_Abort, so
  the run stops at the first failure (like -x) and mpiexec exits nonzero;
* a test past its pytest-timeout limit (`timeout` in pyproject.toml, `--timeout`,
  `@pytest.mark.timeout`) is reported the same way (the rank, the test, its captured output and
  every thread's stack) and ends the whole job. pytest-timeout's `signal` method cannot interrupt
  a rank blocked inside an MPI call, so here a timer thread does it, whatever method is configured;
* ranks other than 0 print nothing on stdout: rank 0's output is the run's report (skip reasons
  and all, since every rank runs the same tests).

The repository's tests/conftest.py loads it (pytest_plugins). To use it for tests elsewhere, put
this directory on PYTHONPATH and pass `-p mpi_harness` (tests/test_harness.py does).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import _pytest
import pluggy
import pytest


ABORT_GRACE_S = 0.5  # seconds between printing why the job ends and ending it


def _mpi_run(config: pytest.Config) -> bool:
    """Whether pytest-mpi was asked to run the MPI tests (--with-mpi or --only-mpi)."""
    return bool(config.getoption("--with-mpi", default=False) or config.getoption("--only-mpi", default=False))


@pytest.hookimpl(trylast=True)  # after the terminal plugin has registered its reporter
def pytest_configure(config: pytest.Config) -> None:
    if not _mpi_run(config):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size > 1:
        config.pluginmanager.register(MpiWorld(config, comm), "mpi_harness_world")


_MACHINERY = tuple(os.path.dirname(m.__file__) + os.sep for m in (pytest, pluggy, _pytest))


def _is_machinery(filename: str) -> bool:
    """Frames of pytest, pluggy and runpy: the same in every stack, never where a test hangs."""
    return filename.startswith(_MACHINERY) or filename.startswith("<frozen runpy>")


class MpiWorld:
    """The hooks of a run over more than one rank."""

    def __init__(self, config: pytest.Config, comm) -> None:
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        # The real stderr, kept now: while a test runs, pytest's capture points fd 2 at a temporary
        # file, and what a rank writes there just before the job ends would be lost.
        self.err = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
        self.lock = threading.Lock()  # the timeout thread and the main thread may both end the job
        if self.rank > 0:
            self._silence_terminal(config)

    @staticmethod
    def _silence_terminal(config: pytest.Config) -> None:
        """Replace this rank's terminal reporter by one writing to os.devnull.

        (Replaced rather than removed: pytest and its plugins, pytest-timeout's included, expect one.
        Redirecting fd 1 would not last: pytest's capture restores it after every test.)"""
        old = config.pluginmanager.get_plugin("terminalreporter")
        if old is None:
            return
        config.pluginmanager.unregister(old)
        quiet = pytest.TerminalReporter(config, open(os.devnull, "w"))
        config.pluginmanager.register(quiet, "terminalreporter")

    # ----------------------------------------------------------------------------- ending the job

    def _end_job(self, title: str, body: str, from_main_thread: bool = True) -> None:
        """Print `title` and `body` to the real stderr, headed with this rank, then end every rank."""
        from mpi4py import MPI

        with self.lock:
            try:
                if from_main_thread:  # (the timer thread leaves it: the main thread may hold its lock)
                    sys.stdout.flush()  # rank 0's progress so far (the F) before the report
                bar = "=" * 20
                self.err.write(f"\n{bar} [rank {self.rank} of {self.size}] {title} {bar}\n{body.rstrip()}\n"
                               f"{bar} [rank {self.rank} of {self.size}] ending the MPI job (MPI_Abort) {bar}\n")
                self.err.flush()
                # mpiexec forwards a rank's output by reading its pipes; on MPI_Abort it kills every
                # rank and may drop what it has not read yet. A moment's grace gets the report out,
                # and the report of another rank timing out at the same moment with it.
                time.sleep(ABORT_GRACE_S)
            finally:
                # From the timer thread MPI may be called only under MPI_THREAD_MULTIPLE (mpi4py's
                # default); otherwise exit the process: mpiexec (Hydra, Open MPI) then kills the others.
                if from_main_thread or MPI.Query_thread() == MPI.THREAD_MULTIPLE:
                    self.comm.Abort(1)
                os._exit(1)

    @staticmethod
    def _with_sections(text: str, sections) -> str:
        for name, content in sections:
            if content.strip():
                text += f"\n{'-' * 10} {name} {'-' * 10}\n{content.rstrip()}\n"
        return text

    @pytest.hookimpl(trylast=True)  # after the terminal reporter has shown the F
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self._end_job(f"{report.nodeid} FAILED ({report.when})",
                          self._with_sections(report.longreprtext, report.sections))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._end_job(f"collecting {report.nodeid or 'the tests'} FAILED", report.longreprtext)

    def pytest_internalerror(self, excrepr) -> None:
        self._end_job("pytest INTERNALERROR", str(excrepr))

    def pytest_report_header(self, config: pytest.Config) -> str:
        return (f"mpi_harness: {self.size} ranks; a failure or a timeout on any rank ends the job "
                "(MPI_Abort); ranks > 0 print only failures, to stderr")

    # --------------------------------------------------------------------------------- timeouts

    @pytest.hookimpl(tryfirst=True, optionalhook=True)  # a pytest-timeout hook; ours wins over its own
    def pytest_timeout_set_timer(self, item: pytest.Item, settings) -> bool:
        timer = threading.Timer(settings.timeout, self._timed_out, (item, settings.timeout))
        timer.name = f"mpi_harness timeout {item.nodeid}"
        timer.daemon = True

        def cancel() -> None:
            timer.cancel()
            timer.join()

        item.cancel_timeout = cancel  # what pytest-timeout's own pytest_timeout_cancel_timer calls
        timer.start()
        return True

    def _timed_out(self, item: pytest.Item, seconds: float) -> None:
        body = ""
        try:
            capman = item.config.pluginmanager.getplugin("capturemanager")
            if capman is not None:
                capman.suspend_global_capture(in_=True)
                out, err = capman.read_global_capture()
                body = self._with_sections("", [("Captured stdout", out), ("Captured stderr", err)])
            me = threading.get_ident()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    stack = [f for f in traceback.extract_stack(frame) if not _is_machinery(f.filename)]
                    body += (f"\n{'-' * 10} stack of thread {names.get(ident, ident)} {'-' * 10}\n"
                             + "".join(traceback.format_list(stack)))
        except Exception:  # the job must end whatever went wrong in describing it
            body += "\n(could not describe the timeout)\n" + traceback.format_exc()
        self._end_job(f"{item.nodeid} TIMEOUT: still running after {seconds:g} s", body,
                      from_main_thread=False)
