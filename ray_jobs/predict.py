"""Ray job: the trained model's predictions over a folder, COCO JSON or list of images.

    ray job submit --working-dir . -- python ray_jobs/predict.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg predict --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
