"""A fixed seed per test, independent of which tests ran before it in the same process.

pytest-xdist spreads a module's tests over workers, so a module-level generator would
give each test different draws from run to run; seed_of(request) is the same every time.
"""
import zlib


def seed_of(request) -> int:
  """crc32 of the test's node id (file, name and parameters)."""
  return zlib.crc32(request.node.nodeid.encode())
