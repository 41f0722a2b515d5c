"""Library discovery: $FUSEDHEAD_LIBRARY, next to the package, and a clear ImportError."""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import _util  # noqa: F401  (sys.path)
import fusedhead as fh

PKG = os.path.dirname(os.path.abspath(fh.__file__))


def run(code, env_lib, cwd):
    env = dict(os.environ)
    env.pop("FUSEDHEAD_LIBRARY", None)
    if env_lib is not None:
        env["FUSEDHEAD_LIBRARY"] = env_lib
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


class Loading(unittest.TestCase):
    def test_version_and_struct_sizes(self):
        self.assertEqual(fh.version(), "0.1.0")
        self.assertEqual(fh._lib.lib.fh_version_number(), 100)

    def test_library_next_to_package(self):
        with tempfile.TemporaryDirectory() as d:
            shutil.copytree(PKG, os.path.join(d, "fusedhead"), ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(fh.library_path, os.path.join(d, "fusedhead", "libfusedhead.so"))
            r = run("import fusedhead; print(fusedhead.library_path)", None, d)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.strip(), os.path.join(d, "fusedhead", "libfusedhead.so"))

    def test_bad_env_path_is_an_import_error(self):
        with tempfile.TemporaryDirectory() as d:
            r = run("import fusedhead", os.path.join(d, "missing.so"), os.path.dirname(PKG))
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("ImportError", r.stderr)
            self.assertIn("FUSEDHEAD_LIBRARY", r.stderr)


if __name__ == "__main__":
    unittest.main()
