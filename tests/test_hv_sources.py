"""Images built from another source tree (a lab's working copy, a planted bug) and from the package's own."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from hypervisors import build


def _digest(name: str) -> str:
    return hashlib.sha256(build.image(name).code).hexdigest()


@pytest.fixture
def copied_tree(tmp_path):
    tree = tmp_path / "hypervisors"
    shutil.copytree(build.HERE, tree, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return tree


def test_a_copied_tree_builds_the_same_images(copied_tree):
    with build.sources(copied_tree):
        copied = {name: _digest(name) for name in build.HYPERVISORS}
    assert copied == {name: _digest(name) for name in build.HYPERVISORS}


def test_a_changed_include_changes_only_the_block_s_images(copied_tree):
    own = _digest("hv2")
    service = copied_tree / "common" / "service.inc"
    service.write_text(service.read_text() + "\n  int3\n")
    with build.sources(copied_tree):
        assert build.sources_root() == copied_tree.resolve()
        changed = _digest("hv2")
    assert changed != own
    assert _digest("hv2") == own


def test_the_environment_names_the_tree_for_a_whole_process(copied_tree):
    top = copied_tree / "hv1" / "hv1.s"
    top.write_text(top.read_text() + "\n  int3\n")
    program = "from hypervisors import build; import hashlib; print(hashlib.sha256(build.image('hv1').code).hexdigest())"
    environment = {**os.environ, build.SOURCES_ENVIRONMENT: str(copied_tree)}
    printed = subprocess.run([sys.executable, "-c", program], env=environment, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert printed != _digest("hv1")


def test_a_directory_that_is_no_source_tree_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="it lacks common/"):
        with build.sources(tmp_path):
            pass
