"""Where a case runs: in this process, or in a fresh process of its own.

On CPU each case runs in its own process, forked from a server that has imported torch and
the model libraries once (``preload``): peak RSS (VmHWM) then holds no allocator cache or
library of an earlier case, and no case pays the imports. A case that crashes, is killed
(out of memory) or passes its timeout is reported as an error; the run goes on. On CUDA and
for the tests cases run in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import signal
import time

from .measure import CONTENDED, run_case_guarded

ISOLATIONS = ("auto", "process", "in-process")


def _child(case: dict, conn) -> None:
    result = run_case_guarded(case)
    # A forked process starts at zero CPU time: this is the whole case's (build, set-up,
    # runs), the figure to estimate a run's length from on a busy machine.
    result["case_cpu_s"] = round(time.process_time(), 2)
    conn.send(result)
    conn.close()


class CaseRunner:
    def __init__(self, isolation: str, timeout_s: float) -> None:
        self.isolation = isolation
        self.timeout_s = timeout_s
        self._ctx = None
        if isolation == "process":
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(["gradnorm_bench.preload"])

    def __call__(self, case: dict) -> dict:
        if self._ctx is None:
            return run_case_guarded(case)
        return self._in_process_of_its_own(case)

    def _in_process_of_its_own(self, case: dict) -> dict:
        receive, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child, args=(case, send), daemon=True)
        proc.start()
        send.close()
        try:
            if not receive.poll(self.timeout_s):
                proc.kill()
                proc.join()
                return {
                    **case,
                    "status": "error",
                    "reason": f"timed out after {self.timeout_s:.0f} s",
                }
            try:
                return receive.recv()
            except EOFError:
                proc.join()
                return {**case, "status": "error", "reason": _death(proc.exitcode)}
        finally:
            receive.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the case's process was killed by {name}{hint}"
    return f"the case's process exited with status {exitcode} without a result"


def wait_for_quiet_cpu(max_wait: float) -> None:
    """Wait (at most max_wait s) until the CPU pressure of the last 10 s is below CONTENDED."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        try:
            with open("/proc/pressure/cpu") as f:
                avg10 = float(re.search(r"^some avg10=([\d.]+)", f.read(), re.M).group(1))
        except (OSError, AttributeError, ValueError):
            return
        if avg10 < CONTENDED * 100:
            return
        time.sleep(2)
