"""Ray job: MaskCut pseudo masks (COCO instances) of a folder, COCO JSON or list of images.

    ray job submit --working-dir . -- python ray_jobs/maskcut.py \
        --config configs/coco.yaml data.source=s3://bucket/coco/train2017

Arguments are those of `u2seg maskcut --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["maskcut", *sys.argv[1:]]))
