"""Ray job: panoptic pseudo labels from the pseudo things and the pseudo stuff.

    ray job submit --working-dir . -- python ray_jobs/panoptic.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg panoptic --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["panoptic", *sys.argv[1:]]))
