"""One process of a distributed test run (tests/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py RUN.json OUT [--resume]

It is ``normlab.run`` with the test plugins registered (killer, rankstate), which a run file cannot name.
"""

import json
import sys

import normlab
import plugins_for_tests as p

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        config = json.load(f)
    normlab.run(config, out=sys.argv[2], resume="--resume" in sys.argv[3:],
                plugins={"killer": p.Killer(), "rankstate": p.RankState()}, quiet=True)
