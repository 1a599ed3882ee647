"""Ray job: self-training rounds after `train` (predict, relabel, train from the last weights).

    ray job submit --working-dir . -- python ray_jobs/self_train.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg self-train --help`; the job joins the cluster it was
submitted to. A resubmitted job resumes: finished rounds and steps are kept.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["self-train", *sys.argv[1:]]))
