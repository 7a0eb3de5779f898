"""docs/console.md's shell walkthrough runs as written, copy-pasted into a shell, in an empty
directory: a real replica, the SQLite default database, the commands in order."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from tests.support import REPO
from tests.test_cli import clean_env
from worker import client

DOC = REPO / "docs" / "console.md"


def walkthrough() -> str:
    (block,) = [b for b in re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), re.M | re.S)
                if "sqlite:///console-demo.db" in b]
    return block


def test_the_shell_walkthrough_runs_as_written(tmp_path):
    script = tmp_path / "walkthrough.sh"
    script.write_text(walkthrough())
    bin_dir = str(Path(sys.executable).parent)
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env=clean_env(PATH=f"{bin_dir}:/usr/bin:/bin", PYTHONPATH=str(REPO)))
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr
    for expected in ("request demo-1 retried: back to NEW", "waiting        job DEMO_NOOP is paused",
                     "request demo-3 cancelled",
                     "dms-worker: request demo-3 has already ended (CANCELLED): nothing to cancel",
                     "executions (2):"):
        assert expected in out, (expected, out[-3000:])
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'console-demo.db'}")
    try:
        assert client.request_status(engine, "demo-1")["status"] == "DONE"
    finally:
        engine.dispose()


def test_the_blueprint_example_mounts_the_console_under_its_prefix(sqlite_url, tmp_path, monkeypatch):
    """docs/console.md's Flask example, run as written in a directory holding dms-worker.db."""
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.M | re.S)
                if "create_blueprint" in b]
    (tmp_path / "dms.db").rename(tmp_path / "dms-worker.db")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "host_app"}
    exec(compile(block, "docs/console.md", "exec"), scope)
    app, engine = scope["app"], scope["engine"]
    try:
        c = app.test_client()
        assert c.get("/dms/requests?format=json").status_code == 401
        with c.session_transaction() as sess:
            sess["dms_role"] = "read-only"
        assert c.get("/dms/requests?format=json").status_code == 200
        page = c.get("/dms/").get_data(as_text=True)
        assert 'href="/dms/static/console.css"' in page
    finally:
        engine.dispose()
