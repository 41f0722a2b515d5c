"""Run every python/tests/test_*.py with unittest; print 'python: N passed, N failed'."""
import os
import sys
import time
import unittest


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    start = time.time()
    suite = unittest.defaultTestLoader.discover(here, pattern="test_*.py", top_level_dir=here)
    result = unittest.TextTestRunner(verbosity=int(os.environ.get("FH_TEST_VERBOSITY", "1"))).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - failed - len(result.skipped)
    print("python tests: %d skipped, %.1f s" % (len(result.skipped), time.time() - start))
    print("python: %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 and result.testsRun > 0 else 1


# The guard matters: test_parallel.py spawns processes, which import this module again.
if __name__ == "__main__":
    sys.exit(main())
