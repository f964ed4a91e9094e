"""Helper of tests/test_distributed.py (not a test module): a medda command under torchrun whose rank 1 is killed
with SIGKILL right after it writes its first prediction, as a process lost to the out-of-memory killer would be.

`torchrun --nproc_per_node 2 tests/kill_one_rank.py predict ...` takes the arguments of `medda`.
"""

from __future__ import annotations

import os
import signal
import sys

from medda import api, distributed
from pipelines.cli import app


def main() -> None:
    if distributed.rank() == 1:
        write = api.write_prediction

        def write_then_die(*args, **kwargs):
            path = write(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return path

        api.write_prediction = write_then_die
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
