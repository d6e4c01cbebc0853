"""Where a result was made: the git revision of the lo_tf checkout and the machine's processor."""

import os
import platform
import subprocess


def git_revision():
  """The git revision of this lo_tf checkout, or "unknown" (not a checkout, or no git)."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def machine():
  """The processor's name, or the machine type where the platform reports none ('x86_64')."""
  return platform.processor() or platform.machine()
