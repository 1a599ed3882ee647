"""Ray job: the demo (embedded photos, packaged weights: pseudo labels, training, scores).

    ray job submit --address http://127.0.0.1:8265 -- python ray_jobs/demo.py output=/tmp/demo

Arguments are those of `u2seg demo --help`; the job joins the cluster it was submitted to.
"""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
