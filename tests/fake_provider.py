"""The node provider of tests/fake_cluster.py: Ray's fake multi-node provider, told of reclaimed nodes.

Loaded by the head's autoscaler (provider `type: external`), so it imports nothing of raysst. A cloud's
provider stops listing an instance once it is reclaimed, and the autoscaler then launches a replacement.
Ray's fake provider lists a node whose processes were killed for ever, as "uninitialized" (its status tag
is never up to date, so the autoscaler's liveness check skips it), and no replacement ever comes.

A test can also hold back new nodes (as a cloud out of capacity would) while the file named by the
provider config's `hold_launches_while` exists.
"""

from __future__ import annotations

import os
import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class ReclaimAwareFakeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose node list leaves out nodes whose raylet has died."""

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        hold = self.provider_config.get("hold_launches_while")
        while hold and os.path.exists(hold):  # in the autoscaler's launcher thread, the provider lock not held
            time.sleep(0.5)
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                raylets = entry["node"].all_processes.get("raylet", []) if "node" in entry else []
                if raylets and raylets[0].process.poll() is not None:
                    del self._nodes[node_id]
                    self._terminate_node(entry)  # ends what is left of it (its log monitor)
        return super().non_terminated_nodes(tag_filters)
