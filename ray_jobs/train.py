"""Ray job: training of the panoptic model on the pseudo labels (Ray Train + DeepSpeed).

    ray job submit --working-dir . -- python ray_jobs/train.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg train --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
