"""`python -m tests.diverging_island OUTER_STEP TRAIN_ARGS...`: `intellect-jax train` with one injected fault. Right
after this island applies the mean of outer step OUTER_STEP (before its hash vote) its global params are perturbed,
so its vote must lose against the other islands' and it must re-sync from a peer (tests/test_island.py)."""

import sys

import jax
import numpy as np

from intellect_jax import cli, island


def main(outer_step: int, argv: list[str]) -> int:
    settle = island.ElasticIsland.settle

    def diverging_settle(self, s, metrics, wait=True, fragment=None):
        if s == outer_step:
            st = self.local.state
            bumped = jax.tree.map(lambda a: jax.device_put(np.asarray(a) + np.float32(1e-3), a.sharding),
                                  st.global_params)
            self.local.state = st._replace(global_params=bumped)
            island.log.warning("fault injection: global params perturbed after outer step %d", s)
        return settle(self, s, metrics, wait=wait, fragment=fragment)

    island.ElasticIsland.settle = diverging_settle
    sys.argv = ["intellect-jax", *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
