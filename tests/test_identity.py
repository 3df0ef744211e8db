"""Which dispatch and node a task belongs to, on every execution path.

Covalent's context is set only on its managed path (local and Dask executors);
remote executor plugins run hooks through ``wrapper_fn`` without it. These
tests drive the other sources with what each path really leaves behind: the
plugins' script names, Slurm's job name, and Covalent's own ``io_wrapper``
(legacy Dask) with a per-task work dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

import covalent_lot as lot

from .test_handoff import context  # noqa: F401 - the fixture

DISPATCH = str(uuid.uuid4())


def identity():
    from covalent_lot._covalent import run_identity

    return run_identity()


def run_in_child(code: str, *, argv0: str | None = None, env: dict | None = None,
                 cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` as a script named ``argv0`` (as a plugin runs its exec script)."""
    script = os.path.join(cwd or os.getcwd(), argv0) if argv0 else None
    body = textwrap.dedent(code)
    if script is None:
        return subprocess.run([sys.executable, "-c", body], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)
    with open(script, "w") as f:
        f.write(body)
    try:
        return subprocess.run([sys.executable, script], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)
    finally:
        os.unlink(script)


PRINT_IDENTITY = """
    from covalent_lot._covalent import run_identity
    found = run_identity()
    print(found[0]["dispatch_id"], found[0]["node_id"], found[1], sep="|") if found else print("none")
"""


def test_managed_path_uses_covalent_context(context):
    with context("d-1", 3):
        assert identity() == ({"dispatch_id": "d-1", "node_id": "3"}, "Covalent's context (managed execution)")


def test_nothing_identifies_the_test_process():
    assert identity() is None


@pytest.mark.parametrize("argv0, how", [
    (f"exec_{DISPATCH}_7.py", "covalent-ssh-plugin script"),
    (f"script-{DISPATCH}-7.py", "covalent-slurm-plugin script"),
])
def test_plugin_script_names(tmp_path, argv0, how):
    result = run_in_child(PRINT_IDENTITY, argv0=argv0, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{DISPATCH}|7|{how}"


def test_slurm_job_name(tmp_path):
    result = run_in_child(PRINT_IDENTITY, env={"SLURM_JOB_NAME": f"covalent-12-{DISPATCH}"}, cwd=str(tmp_path))
    assert result.stdout.strip() == f"{DISPATCH}|12|the Slurm job name"
    # A job the user named otherwise says nothing.
    result = run_in_child(PRINT_IDENTITY, env={"SLURM_JOB_NAME": "my-job"}, cwd=str(tmp_path))
    assert result.stdout.strip() == "none"


def test_per_task_work_dir_as_the_process_cwd(tmp_path):
    workdir = tmp_path / DISPATCH / "node_5"
    workdir.mkdir(parents=True)
    result = run_in_child(PRINT_IDENTITY, cwd=str(workdir))
    assert result.stdout.strip() == f"{DISPATCH}|5|the executor's per-task work dir"


def test_legacy_dask_reads_its_own_io_wrapper_work_dir_not_the_cwd(tmp_path):
    """Covalent's io_wrapper chdir()s process-wide while other threads run other
    tasks: only the work dir it was given for this task counts."""
    from covalent.executor.utils.wrappers import io_wrapper

    own = tmp_path / DISPATCH / "node_2"
    other = tmp_path / str(uuid.uuid4()) / "node_9"
    other.mkdir(parents=True)
    cwd = os.getcwd()

    def task():
        os.chdir(other)  # another task's chdir, as a second worker thread would do
        return identity()

    output, _, _, tb = io_wrapper(task, [], {}, str(own))
    os.chdir(cwd)
    assert tb == ""
    assert output == ({"dispatch_id": DISPATCH, "node_id": "2"}, "the executor's per-task work dir")

    output, _, _, tb = io_wrapper(identity, [], {}, str(tmp_path / "shared-workdir"))
    os.chdir(cwd)
    assert tb == "" and output is None  # create_unique_workdir off: nothing to go on


def test_unknown_dispatch_names_the_executor_option(tmp_path):
    from covalent_lot._covalent import resolve_template

    with pytest.raises(RuntimeError) as info:
        resolve_template("s3://bkt/runs/{dispatch_id}/x.npy")
    message = str(info.value)
    assert "'s3://bkt/runs/{dispatch_id}/x.npy'" in message
    assert "create_unique_workdir=True" in message and "run id" in message


def test_upload_hook_fails_before_the_electron_without_identity(tmp_path):
    """On a path with no identity, the pre-exec hook (run before the electron) is
    where a {dispatch_id} URI fails: no byte has moved, nothing was written."""
    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.npy", staging_dir=str(tmp_path))
    pre, _ = h.upload().cp()
    with pytest.raises(RuntimeError, match="create_unique_workdir=True"):
        pre()
    assert os.listdir(tmp_path) == []


def test_default_local_path_needs_no_identity(tmp_path):
    """A URI without placeholders works on any path: the default local path falls
    back to a token of the task's process and thread."""
    h = lot.handoff("s3://bkt/fixed/x.npy", staging_dir=str(tmp_path))
    pre, _ = h.upload().cp()
    local, uri = pre()
    assert uri == "s3://bkt/fixed/x.npy"
    assert local == h.path
    assert f"run-{os.getpid()}-{threading.get_ident()}" in local
    assert os.path.isdir(os.path.dirname(local))


def test_hooks_resolve_identity_from_the_plugin_script(tmp_path):
    """The seed scenario's hooks as covalent-ssh-plugin runs them: no context, the
    dispatch taken from the exec script's name."""
    import cloudpickle

    h = lot.handoff("s3://bkt/runs/{dispatch_id}/x.npy", staging_dir=str(tmp_path / "staging"))
    pre, _ = h.upload().cp()
    (tmp_path / "hook.pkl").write_bytes(cloudpickle.dumps(pre))
    result = run_in_child(f"""
        import cloudpickle
        hook = cloudpickle.load(open({str(tmp_path / "hook.pkl")!r}, "rb"))
        print(*hook(), sep="|")
    """, argv0=f"exec_{DISPATCH}_0.py", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    local, uri = result.stdout.strip().split("|")
    assert uri == f"s3://bkt/runs/{DISPATCH}/x.npy"
    assert local.startswith(str(tmp_path / "staging" / DISPATCH) + os.sep)
