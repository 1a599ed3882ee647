"""Ray job: every stage of the pipeline in order, resuming what a killed run left.

    ray job submit --working-dir . -- python ray_jobs/run.py --config configs/coco.yaml

Arguments are those of `u2seg run --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
