"""The processes of a distributed test run (tests/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py RUN.json OUT [--resume]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py JOBS.json

It is ``normlab.run`` with the test plugins registered (killer, rankstate), which a run file cannot name.
JOBS.json is a list of ``{"config": ..., "out": ..., "env": {...}, "resume": false}``: the runs one after
another in the same processes (each with its own process group), with ``env`` set for that run only. One
launch for several runs saves the start of torchrun and of every process (seconds each on a slow machine).
"""

import json
import os
import sys

import normlab
import plugins_for_tests as p


def run(config, out, resume=False, env=None):
    before = dict(os.environ)
    os.environ.update(env or {})
    try:
        normlab.run(config, out=out, resume=resume, plugins={"killer": p.Killer(), "rankstate": p.RankState()},
                    quiet=True)
    finally:
        os.environ.clear()
        os.environ.update(before)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if isinstance(spec, list):
        for job in spec:
            run(job["config"], job["out"], resume=job.get("resume", False), env=job.get("env"))
    else:
        run(spec, sys.argv[2], resume="--resume" in sys.argv[3:])
