r"""Train, evaluate or sample a VDM.

  python main.py --config=configs/digits.py --workdir=/tmp/vdm_digits
  python main.py --config=configs/digits.py --workdir=/tmp/vdm_digits --mode=eval
  python main.py --config=configs/digits.py --workdir=/tmp/vdm_digits --mode=sample \
      --config.sample.sampler=ddim --config.sample.num_steps=50 --config.sample.gif=True

Any config field can be overridden with --config.a.b=value. Training resumes
from the newest checkpoint in --workdir; --mode=eval and --mode=sample load
the newest one (or --config.eval.checkpoint_step=N, --config.sample.checkpoint_step=N).
The first start records the config in --workdir/config.json; a resume that
changes more than num_steps, eval.*, sample.* or the logging and checkpoint
frequencies stops with the changed fields, unless --allow_config_change.

Several hosts (or several processes on one machine): start the same command
once per process with
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(process 0's HOST; on CPU the processes talk through gloo), or with
--distributed alone where JAX finds the cluster itself (Cloud TPU pods, SLURM,
Open MPI). The global batch (training.batch_size) is split over all devices
of all processes and must be divisible by their number.
"""
import functools
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detection.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "--mode=eval only: evaluate this google-research/vdm clu checkpoint "
    "directory (ckpt-N.flax files; local or gs://) instead of the newest one in --workdir.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume training even though the config differs from workdir/config.json in fields "
    "that change the run (the change is logged and recorded).")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed():
  if _COORDINATOR.value:
    # Cross-process collectives of the CPU backend (no effect on GPU/TPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; options are --flag=value")
  try:
    config = _CONFIG.value
    config.to_dict()  # a file that failed to load raises here
  except OSError as err:  # config_flags loads the file lazily and chains the cause
    sys.exit("error: cannot load the --config file: " + " ".join(str(err.__cause__ or err).split()))
  if _CHECKPOINT.value and _MODE.value != "eval":
    sys.exit("error: --checkpoint names a checkpoint to evaluate; use it with --mode=eval")
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.use_cpu_devices(config.cpu_devices)
  except train.ConfigError as err:
    sys.exit(f"error: {err}")
  _initialize_distributed()
  logging.info("JAX process %d of %d, %d devices: %s", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices())
  run = {"train": functools.partial(train.train_and_evaluate,
                                   allow_config_change=_ALLOW_CONFIG_CHANGE.value),
         "eval": functools.partial(train.evaluate, checkpoint=_CHECKPOINT.value),
         "sample": train.sample}[_MODE.value]
  # A preemption's SIGTERM unwinds like an exception: pending checkpoint writes
  # finish and the workdir lock is released (SIGKILL leaves a stale lock that
  # the next run on this host takes over).
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    result = run(config, _WORKDIR.value)
  except (train.ConfigError, train.CheckpointError, train.TrainingError) as err:
    sys.exit(f"error: {err}")
  if _SIGTERM_RECEIVED:  # the SystemExit was swallowed (raised inside a callback): exit as told
    sys.exit(128 + signal.SIGTERM)
  logging.info("%s result: %s", _MODE.value, result)
  if jax.process_index() == 0:
    print(f"{_MODE.value}: {result}")


_SIGTERM_RECEIVED = []


def _exit_on_sigterm(signum, frame):
  """Raises SystemExit(128 + signum) in the main thread and remembers that it did.

  Python runs the handler between bytecodes of the main thread; if that happens inside
  code that ignores exceptions (a __del__ or weakref callback), the SystemExit is lost.
  So training is also asked to stop after its current step (train.request_stop), and
  main() checks _SIGTERM_RECEIVED after the run returns.
  """
  del frame
  from vdm_jax import train  # pylint: disable=g-import-not-at-top (loaded by main already)
  _SIGTERM_RECEIVED.append(signum)
  train.request_stop(128 + signum)
  sys.exit(128 + signum)


def _parse_flags(argv):
  """absl flag parsing with one-line errors (config_flags raises AttributeError/KeyError)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:
    message = re.sub(r"\\n|\n", " ", str(err)).replace("\\", "").replace("'", "")
    sys.exit(f"error: a --config override names a field the config does not have: {message}")
  except (flags.Error, TypeError, ValueError) as err:
    sys.exit(f"error: bad flag: {err}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
