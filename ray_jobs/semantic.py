"""Ray job: stuff pseudo classes per pixel (patch k-means or a STEGO head).

    ray job submit --working-dir . -- python ray_jobs/semantic.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg semantic --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["semantic", *sys.argv[1:]]))
