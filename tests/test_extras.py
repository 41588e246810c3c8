"""What each pip extra is for: `export build` runs on the light `[export]` extra, and the one option
that needs TensorFlow says which extra to install instead of failing on an import."""

import subprocess
import sys

from test_export import ROOT

# Runs the export CLI with TensorFlow and orbax hidden, as on a host with the export extra alone.
WITHOUT_TF = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "orbax"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_tf_savedmodel_without_its_extra_says_which_to_install(tmp_path):
    r = subprocess.run([sys.executable, "-c", WITHOUT_TF, "build", "--mesh", "1x1", "--tf-savedmodel", "--out",
                        str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tf-savedmodel needs tensorflow and orbax.export" in lines[0], r.stderr
    assert "pip install -e '.[savedmodel]'" in lines[0]
    assert not (tmp_path / "a").exists()


def test_build_needs_no_tensorflow(tmp_path):
    """A whole (small) build with TensorFlow and orbax unimportable."""
    ladder = tmp_path / "b.json"
    ladder.write_text('{"tokens": [4], "max_seqs": 4}')
    r = subprocess.run([sys.executable, "-c", WITHOUT_TF, "build", "--mesh", "1x1", "--padding-modes", "max_len",
                        "--buckets", str(ladder), "--quiet", "--out", str(tmp_path / "a")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "manifest.json").is_file()
