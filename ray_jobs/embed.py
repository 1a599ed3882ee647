"""Ray job: one vector per MaskCut pseudo mask (the backbone's CLS token of its crop).

    ray job submit --working-dir . -- python ray_jobs/embed.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg embed --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
