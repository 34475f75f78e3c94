"""Your own images: every PNG/JPEG under a folder, resized and centre-cropped.

Images in sub-folders get the sub-folder's index (sorted names) as label. A
fixed 10% of the files is held out for evaluation.

  python main.py --config=configs/image_folder.py --workdir=/tmp/vdm_mine \
      --config.data.path=/path/to/images
  (the crop size and colour mode follow model.image_shape: C=1 grey, C=3 RGB)
"""
from configs import default


def get_config():
  """Returns the image-folder ConfigDict (set data.path on the command line)."""
  config = default.get_config()
  config.data.dataset = "image_folder"
  config.data.test_fraction = 0.1
  config.model.image_shape = (32, 32, 3)
  config.model.n_embd = 64
  config.model.n_layer = 8
  config.training.batch_size = 64
  config.training.num_steps = 100_000
  config.training.eval_every = 5_000
  config.training.checkpoint_every = 5_000
  config.eval.batch_size = 64
  return config
