"""CI instrumentation for run-test-config.sh, loaded by every Python process of the run through
PYTHONPATH (sbatch --export=ALL carries it into the jobs). It acts only in saeflow stage processes
(``python -m saeflow.<module> ...``) and only when these variables are set:

SAEFLOW_CI_PROBE=FILE           append one JSON line per stage process to FILE: the command, the
                                SLURM job id and partition, CUDA_VISIBLE_DEVICES. Evidence that
                                each job ran inside a SLURM allocation, and which got the GPU.
SAEFLOW_CI_FAIL_ONCE=CMD=MARKER the first process whose command starts with ``saeflow.CMD``
                                (e.g. ``sae_eval summarize``) creates MARKER and exits 1; later
                                ones run normally. A transient failure, for the retry check.
SAEFLOW_CI_SLEEP=CMD=SECONDS    processes of ``saeflow.CMD`` sleep first: a job that outlives its
                                time limit.
"""

import json
import os
import sys
import time


def _stage_command() -> str | None:
    argv = getattr(sys, "orig_argv", sys.argv)
    if "-m" not in argv[:-1]:
        return None
    i = argv.index("-m")
    if not argv[i + 1].startswith("saeflow."):
        return None
    return " ".join([argv[i + 1].removeprefix("saeflow."), *argv[i + 2 :]])


def _setting(name: str, command: str) -> str | None:
    """The value part of NAME=CMD=VALUE when ``command`` starts with CMD."""
    spec = os.environ.get(name)
    if not spec or "=" not in spec:
        return None
    prefix, value = spec.split("=", 1)
    return value if command.startswith(prefix) else None


def _main() -> None:
    command = _stage_command()
    if command is None:
        return
    probe = os.environ.get("SAEFLOW_CI_PROBE")
    if probe:
        record = {
            "command": command,
            "pid": os.getpid(),
            **{
                key: os.environ.get(key)
                for key in (
                    "SLURM_JOB_ID",
                    "SLURM_JOB_PARTITION",
                    "SLURM_CPUS_PER_TASK",
                    "CUDA_VISIBLE_DEVICES",
                )
            },
        }
        with open(probe, "a") as f:
            f.write(json.dumps(record) + "\n")
    marker = _setting("SAEFLOW_CI_FAIL_ONCE", command)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            print(
                f"sitecustomize: injected transient failure of saeflow.{command}", file=sys.stderr
            )
            sys.stderr.flush()
            os._exit(1)
    seconds = _setting("SAEFLOW_CI_SLEEP", command)
    if seconds:
        print(f"sitecustomize: sleeping {seconds} s before saeflow.{command}", file=sys.stderr)
        sys.stderr.flush()
        time.sleep(float(seconds))


_main()
