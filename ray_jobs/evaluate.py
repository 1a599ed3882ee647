"""Ray job: score a run's predictions against ground truth (u2seg evaluate).

    ray job submit --working-dir . -- python ray_jobs/evaluate.py --config configs/coco.yaml \
        output=s3://bucket/runs/coco_val

Arguments are those of `u2seg evaluate --help`; from `evaluate.ray_min_images` images on,
the chunks run on Ray Data across the cluster the job was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
