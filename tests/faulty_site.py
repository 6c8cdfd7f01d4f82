"""``fedmed-client`` whose site work goes wrong, as a real hospital's can:

- ``python tests/faulty_site.py fail ROUND FEDMED_CLIENT_ARGS...`` fails in round ROUND,
  as a disk error would;
- ``python tests/faulty_site.py stall ROUND FEDMED_CLIENT_ARGS...`` hangs in round ROUND
  of any Flower run after the first it served (a restarted coordinator starts a new Flower
  run), after saying so on its output, so a test can kill it while it is certainly mid-round.

Everything else is the real client: its SuperNode, its site runtime and its ledger."""

from __future__ import annotations

import sys
import time

from fedmed.cli import client
from fedmed.flower import client_app
from fedmed.protocol import TrainRequest
from fedmed.site.work import SiteWork

MODE = sys.argv.pop(1)
ROUND = int(sys.argv.pop(1))
_train = SiteWork.train
_do = client_app._do
_flower_runs: list[int] = []


def _train_or_fail(self, run, vector, round_number):
    if round_number == ROUND:
        raise OSError(f"the site's disk failed in round {round_number}")
    return _train(self, run, vector, round_number)


def _do_or_stall(request, context):
    if context.run_id not in _flower_runs:
        _flower_runs.append(context.run_id)
    if isinstance(request, TrainRequest) and request.round == ROUND and _flower_runs.index(context.run_id) > 0:
        print(f"site work stalled in round {ROUND} of a later run", flush=True)
        time.sleep(3600)
    return _do(request, context)


if MODE == "fail":
    SiteWork.train = _train_or_fail
else:
    client_app._do = _do_or_stall

if __name__ == "__main__":
    sys.exit(client.main())
