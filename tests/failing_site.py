"""``fedmed-client`` whose site work fails in one round, as a disk error would:
``python tests/failing_site.py ROUND FEDMED_CLIENT_ARGS...``.

Everything else is the real client: its SuperNode, its site runtime and its ledger."""

from __future__ import annotations

import sys

from fedmed.cli import client
from fedmed.flower.site_work import SiteWork

FAILING_ROUND = int(sys.argv.pop(1))
_train = SiteWork.train


def _train_or_fail(self, run, vector, round_number):
    if round_number == FAILING_ROUND:
        raise OSError(f"the site's disk failed in round {round_number}")
    return _train(self, run, vector, round_number)


SiteWork.train = _train_or_fail

if __name__ == "__main__":
    sys.exit(client.main())
