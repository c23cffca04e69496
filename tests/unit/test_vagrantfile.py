"""The project's Vagrantfile: Ruby syntax, and Vagrant's own validation of the configuration.

No box can be downloaded on the test machines, so `vagrant up` is not run here; the VM's
provisioning is scripts/bootstrap.sh, which `make setup` (and so CI) runs for real.
Vagrant runs with a throwaway HOME and VAGRANT_HOME, no update checks, and from a temporary
copy of the Vagrantfile, so nothing is written to the project or to the real home.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VAGRANTFILE = ROOT / "Vagrantfile"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"`{name}` is missing: scripts/bootstrap.sh --test installs it")
        pytest.skip(f"`{name}` is not installed (sudo make setup-test installs it)")
    return path


def vagrant_validate(vagrantfile_text: str) -> subprocess.CompletedProcess[str]:
    """`vagrant validate --ignore-provider` on a copy of the text, isolated from everything."""
    vagrant = require_tool("vagrant")
    with tempfile.TemporaryDirectory(prefix="ambient-lab-vagrant-") as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        (work / "Vagrantfile").write_text(vagrantfile_text)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "VAGRANT_HOME": str(Path(tmp) / "vagrant.d"),
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
            "VAGRANT_NO_PLUGINS": "1",
            "VAGRANT_CWD": str(work),
            "LANG": "C.UTF-8",
        }
        return subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)


def test_vagrantfile_ruby_syntax():
    ruby = require_tool("ruby")
    result = subprocess.run([ruby, "-c", str(VAGRANTFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stdout


def test_vagrant_validates_the_vagrantfile():
    result = vagrant_validate(VAGRANTFILE.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrant_validate_catches_a_wrong_setting():
    """The validation above can fail: a misspelt setting is refused."""
    text = VAGRANTFILE.read_text().replace("config.vm.hostname =", "config.vm.hostnme =")
    result = vagrant_validate(text)
    assert result.returncode != 0
    assert "hostnme" in result.stdout + result.stderr


def test_vm_shape():
    """Ubuntu 24.04, 2 CPUs, 4 GiB, provisioned by bootstrap.sh run in place as root."""
    text = VAGRANTFILE.read_text()
    assert re.search(r'"bento/ubuntu-24\.04"', text)
    assert re.search(r"^CPUS = 2$", text, re.M)
    assert re.search(r"^MEMORY_MIB = 4096$", text, re.M)
    assert 'config.vm.synced_folder ".", "/vagrant"' in text
    # run from the synced folder (an uploaded copy could not find the project), as root
    assert re.search(r'inline: "cd /vagrant && scripts/bootstrap\.sh"', text)
    assert "privileged: true" in text
    # shared/ (the conformance files) is not shipped: the VM must not depend on it
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "shared" not in code
