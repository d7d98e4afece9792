"""The node provider of tests/fake_cluster.py: Ray's fake multi-node provider, told of reclaimed nodes.

Loaded by the head's autoscaler (provider `type: external`), so it imports nothing of raysst. A cloud's
provider stops listing an instance once it is reclaimed, and the autoscaler then launches a replacement.
Ray's fake provider lists a node whose processes were killed for ever, as "uninitialized" (its status tag
is never up to date, so the autoscaler's liveness check skips it), and no replacement ever comes.
"""

from __future__ import annotations

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class ReclaimAwareFakeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose node list leaves out nodes whose raylet has died."""

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                raylets = entry["node"].all_processes.get("raylet", []) if "node" in entry else []
                if raylets and raylets[0].process.poll() is not None:
                    del self._nodes[node_id]
                    self._terminate_node(entry)  # ends what is left of it (its log monitor)
        return super().non_terminated_nodes(tag_filters)
