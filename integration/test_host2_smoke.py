"""Smoke test of the second host (_host2.py): its own /tmp, HOME, venvs and covalent.conf,
reached by covalent-ssh-plugin's SSHExecutor from a real `covalent start` server.

Run alone: .venv/bin/python -m pytest integration/test_host2_smoke.py -q -p no:cacheprovider -s
(-s shows the mode and timings). LOT_HOST2_MODE=separate-user forces the fallback mode.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest

from integration import _dask_cluster

# The server and the second host cannot import this test module: ship its
# functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300.0  # one dispatch, start to finish



@pytest.fixture(scope="module")
def server(host2, covalent_server, lot_session_dir):
    assert covalent_server.home_dir == lot_session_dir / "covalent" / "home"
    return covalent_server


def wait_result(dispatch_id: str, timeout: float = TIMEOUT):
    return _dask_cluster.wait_for(dispatch_id, timeout=timeout)


def node_text(result, node_id: int) -> str:
    """The node's error and stderr, for messages."""
    try:
        node = result.get_node_result(node_id)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"<no node result: {exc}>"
    return f"error={node.get('error')!r}\nstderr={node.get('stderr')!r}"


def probe():
    """Runs on the second host: what it sees."""
    import os
    import sys
    import uuid

    out = {
        "cwd": os.getcwd(),
        "home": os.environ.get("HOME"),
        "expanduser": os.path.expanduser("~"),
        "executable": sys.executable,
        "argv0": sys.argv[0],
    }
    try:
        import covalent_lot
        from covalent._shared_files import config as ct_config
        from covalent_lot import _covalent

        out["lot_file"] = covalent_lot.__file__
        out["lot_conf"] = _covalent.read_conf_section("lot")
        out["covalent_conf"] = ct_config._config_manager.config_file
    except ImportError as exc:
        out["lot_file"] = None
        out["lot_error"] = repr(exc)
    path = f"/tmp/host2-probe-{uuid.uuid4().hex}"
    with open(path, "w") as f:
        f.write("written on the second host\n")
    out["tmp_file"] = path
    return out


def import_lot():
    import covalent_lot

    return covalent_lot.__file__


def dispatch(fn, executor):
    import covalent as ct

    electron = ct.electron(fn, executor=executor)

    @ct.lattice
    def flow():
        return electron()

    t0 = time.monotonic()
    dispatch_id = ct.dispatch(flow)()
    result = wait_result(dispatch_id)
    return dispatch_id, result, time.monotonic() - t0


def test_own_home_and_private_tmp(host2, lot_session_dir):
    marker = Path(tempfile.mkdtemp(prefix="host2-dispatcher-", dir="/tmp"))
    try:
        proc = host2.run(["sh", "-c", "echo $HOME; echo ---; ls -A /tmp; echo ---; ls -A ~; echo ---; "
                                      "cat ~/.config/covalent/covalent.conf"], check=True)
    finally:
        marker.rmdir()
    print(f"\n[{host2.mode}] on the second host:\n{proc.stdout[:2000]}")
    home, tmp_list, home_list, conf = proc.stdout.split("---\n")
    assert home.strip() == host2.home
    assert set(home_list.split()) == set(os.listdir(host2.home_dir))
    assert "[lot]" in conf and host2.staging_dir in conf
    if host2.mode == "mount-namespace":
        assert marker.name not in tmp_list.split()
        assert lot_session_dir.name not in tmp_list.split()
        assert host2.path_on_dispatcher("/tmp/x") is None


def test_plain_electron_runs_on_the_host(host2, server):
    dispatch_id, result, seconds = dispatch(probe, host2.executor())
    assert str(result.status) == "COMPLETED", node_text(result, 0)
    out = result.result
    print(f"\n[{host2.mode}] electron on the second host: {seconds:.1f}s (dispatch to result)\n{out}")

    assert out["cwd"] == f"{host2.remote_workdir}/{dispatch_id}/node_0"
    assert out["argv0"].endswith(f"exec_{dispatch_id}_0.py")
    assert out["argv0"].startswith(host2.remote_cache + "/")
    assert out["home"] == out["expanduser"] == host2.home
    assert out["executable"] == host2.python("full")
    site = str(host2.venvs.paths["full"] / "lib")
    assert out["lot_file"].startswith(site + "/"), out
    assert not out["lot_file"].startswith(str(REPO) + "/")
    # The host's own covalent.conf, with the [lot] section written for it.
    assert out["covalent_conf"] == f"{host2.home}/.config/covalent/covalent.conf"
    assert out["lot_conf"]["staging_dir"] == host2.staging_dir
    if host2.mode == "mount-namespace":
        assert not os.path.exists(out["tmp_file"]), "the host's /tmp must not be the dispatcher's"
    assert host2.run(["test", "-f", out["tmp_file"]]).returncode == 0
    host2.run(["rm", "-f", out["tmp_file"]])  # the real /tmp in separate-user mode

    # Covalent merged its defaults into the file and kept [lot].
    conf = host2.read_config()
    assert conf["lot"]["staging_dir"] == host2.staging_dir
    assert "sdk" in conf and "dispatcher" in conf, sorted(conf)

    # Again, warm (bytecode compiled, covalent imported once before).
    _, again, seconds2 = dispatch(probe, host2.executor())
    assert str(again.status) == "COMPLETED", node_text(again, 0)
    print(f"second electron: {seconds2:.1f}s")


def test_bare_venv_cannot_import_covalent_lot(host2, server):
    dispatch_id, result, seconds = dispatch(import_lot, host2.executor(venv="bare"))
    text = f"result.error={result.error!r}\n{node_text(result, 0)}"
    print(f"\n[{host2.mode}] bare venv ({seconds:.1f}s): status={result.status}\n{text}")
    assert str(result.status) == "FAILED"
    assert "No module named 'covalent_lot'" in text
