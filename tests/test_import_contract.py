"""The HTTP side never imports torch, DeepSpeed or the rank code.

Statically: import-linter's forbidden contract in .importlinter, run here so CI shows it
in pytest's summary, with a control that shows it does fail when serve_tp/api imports
torch. At run time: the live replica process has no torch module loaded.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--config", str(cwd / ".importlinter"), "--no-cache"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_contract_is_kept():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 1 kept, 0 broken." in out.stdout


def test_import_contract_breaks_when_the_api_imports_torch(tmp_path):
    """Control: the same contract over a copy whose serve_tp/api/auth.py imports torch."""
    shutil.copytree(ROOT / "serve_tp", tmp_path / "serve_tp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    auth = tmp_path / "serve_tp" / "api" / "auth.py"
    auth.write_text(auth.read_text() + "\nimport torch  # a leak, on purpose\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout
    assert "serve_tp.api.auth -> torch" in out.stdout


def test_live_replica_has_not_imported_torch(serve_app):
    """The replica reports its own sys.modules; its ranks (other processes) do load torch."""
    r = httpx.get(f"{serve_app.base_url}/health", timeout=30)
    assert r.status_code == 200, r.text
    replica = r.json()["replica"]
    assert replica["torch_imported"] is False
    assert replica["deepspeed_imported"] is False
    assert all(rank["pid"] != replica["pid"] for rank in r.json()["ranks"])
