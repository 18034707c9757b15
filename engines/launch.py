"""``run.py --nproc N``: a data-parallel run on this machine through torchrun, reported as a plain run is.

torchrun ends a failed job with its own multi-line report (a ``ChildFailedError`` traceback per failed rank), after
the toolkit's one line, so a user of plain torchrun reads a traceback last. The launcher starts torchrun itself
(``--standalone``: one machine, a free port), lets rank 0's stdout through, and reads the ranks' and torchrun's
stderr. When the job ends it writes the toolkit's lines (``error: ...``, ``interrupted ...``), each once, and drops
torchrun's report; a job that failed without such a line (a bug) shows all of stderr, traceback included.
"""

from __future__ import annotations

import subprocess
import sys

OURS = ("error: ", "interrupted")


def launch(nproc: int, script: str, args: list[str]) -> int:
    """Run ``script args`` under torchrun with ``nproc`` processes; returns the exit code run.py would give."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    lines = []
    while True:
        try:
            lines.extend(process.stderr)
            process.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and the ranks too: wait for them to report and stop
            continue
    ours = list(dict.fromkeys(line for line in lines if line.startswith(OURS)))
    if process.returncode == 0:
        return 0
    if not ours:
        sys.stderr.write("".join(lines))
        return process.returncode
    sys.stderr.write("".join(ours))
    return 130 if all(line.startswith("interrupted") for line in ours) else 2
