"""The trainer's typed errors; main.py turns each into a one-line message and exit status 1.

Both input errors subclass ValueError (they are bad values), so code that catches
ValueError keeps working.
"""


class ConfigError(ValueError):
  """Bad input that the user fixes: a config field, the data, the workdir."""


class CheckpointError(ValueError):
  """A checkpoint that is missing, damaged, or unusable with this config."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint written by another config (a leaf missing or of another shape)."""


class TrainingError(RuntimeError):
  """Training stopped for a reason other than bad input (divergence, full disk)."""
