"""Ray job: k-means (faiss) of the mask embeddings into the pseudo thing classes.

    ray job submit --working-dir . -- python ray_jobs/cluster.py \
        --config configs/coco.yaml output=s3://bucket/runs/coco

Arguments are those of `u2seg cluster --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
