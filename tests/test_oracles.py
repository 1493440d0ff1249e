"""The oracle guard itself (tests/oracles.py) and the timeout setting (tests/timeouts.py).

Each case runs pytest in a subprocess on a tiny test file whose oracle is missing
(a module that does not exist) or broken (a module whose import raises), once with
``NN_CORE_REQUIRE_ORACLES=1`` -- the run must fail -- and once without -- it skips
(the variable set to "0" counts as unset: ``test_a_present_oracle_is_returned``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from oracles import REQUIRE_ORACLES, oracles_required, require_oracle
from timeouts import SUBPROCESS_TIMEOUT, _read_timeout

TESTS = Path(__file__).resolve().parent

IN_A_TEST = """\
from oracles import require_oracle

def test_uses_the_oracle():
    oracle = require_oracle({name!r})
    assert oracle is not None

def test_without_the_oracle():
    pass
"""

AT_MODULE_LEVEL = """\
from oracles import require_oracle

oracle = require_oracle({name!r})

def test_uses_the_oracle():
    assert oracle is not None
"""

BROKEN = "raise OSError('libtorch_cpu.so: cannot open shared object file')\n"


def run_pytest(tmp_path: Path, source: str, required: str | None) -> subprocess.CompletedProcess:
    """pytest on ``source`` (as tmp_path/test_case.py) in a fresh interpreter."""
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "broken_oracle.py").write_text(BROKEN)
    (tmp_path / "test_other.py").write_text("def test_needs_no_oracle():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ORACLES}
    if required is not None:
        env[REQUIRE_ORACLES] = required
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(tmp_path), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*cmd, "-p", "no:hypothesispytest", "test_case.py", "test_other.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )


@pytest.mark.parametrize("name", ["nn_core_no_such_oracle", "broken_oracle"])
@pytest.mark.parametrize("template", [IN_A_TEST, AT_MODULE_LEVEL], ids=["in-test", "module"])
def test_a_missing_or_broken_oracle_fails_when_required_and_skips_otherwise(
    tmp_path: Path, name: str, template: str
) -> None:
    source = template.format(name=name)
    cause = "ModuleNotFoundError" if name.startswith("nn_core_no") else "OSError"

    done = run_pytest(tmp_path, source, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout and "failed" not in done.stdout, done.stdout
    assert f"test oracle {name!r} cannot be imported ({cause}" in done.stdout

    done = run_pytest(tmp_path, source, "1")
    assert done.returncode != 0, done.stdout + done.stderr
    assert "skipped" not in done.stdout, done.stdout
    assert f"{REQUIRE_ORACLES}=1 requires it" in done.stdout, done.stdout
    if template is IN_A_TEST:  # only the test that needs the oracle fails
        assert "1 failed, 2 passed" in done.stdout, done.stdout
    else:  # the module cannot be collected: the run stops with an error
        assert "1 error" in done.stdout, done.stdout


def test_a_present_oracle_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ORACLES, "1")
    assert oracles_required()
    assert require_oracle("json") is sys.modules["json"]
    monkeypatch.setenv(REQUIRE_ORACLES, "0")
    assert not oracles_required()
    monkeypatch.delenv(REQUIRE_ORACLES)
    assert not oracles_required()


def test_subprocess_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SUBPROCESS_TIMEOUT > 0
    monkeypatch.setenv("NN_CORE_TEST_TIMEOUT", "42.5")
    assert _read_timeout() == 42.5
    monkeypatch.delenv("NN_CORE_TEST_TIMEOUT")
    assert _read_timeout() == 600.0
    for bad in ("0", "-1", "nan", "inf", "ten"):
        monkeypatch.setenv("NN_CORE_TEST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="NN_CORE_TEST_TIMEOUT must be a number"):
            _read_timeout()
