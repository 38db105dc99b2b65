#!/usr/bin/env python
"""Teach a diffusion model one subject with an orthogonal adapter (DreamBooth).

    accelerate launch training/train_dreambooth.py \
        --instance_data_dir assets/subjects/split-circle --instance_prompt "a sks circle" \
        --method oft --max_train_steps 400 --output_dir outputs/sks

Without --pretrained_model_name_or_path it trains on the embedded shapes model.  Every flag
can also come from a YAML/TOML file given with --config.  See --help.
"""

import sys

from ortho_diffusion.training.common import run_main
from ortho_diffusion.training.dreambooth import build_parser, run

if __name__ == "__main__":
    sys.exit(run_main(run, build_parser()))
