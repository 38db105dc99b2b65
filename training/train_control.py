#!/usr/bin/env python
"""Train a control adapter: a light control encoder plus orthogonal adapters.

    accelerate launch training/train_control.py \
        --train_data_dir assets/control/data/canny --control_task canny \
        --method oft --max_train_steps 1000 --output_dir outputs/canny

The data is a folder with metadata.jsonl/.csv (image, conditioning_image, text), a .jsonl or
.csv file, images/ + conditioning_images/ folders, a local datasets folder (--dataset_name),
or images with --preprocess canny|landmarks.  Without --pretrained_model_name_or_path it
trains on the embedded shapes model.  Every flag can also come from a YAML/TOML file given
with --config.  See --help.
"""

import sys

from ortho_diffusion.training.common import run_main
from ortho_diffusion.training.control import build_parser, run

if __name__ == "__main__":
    sys.exit(run_main(run, build_parser()))
