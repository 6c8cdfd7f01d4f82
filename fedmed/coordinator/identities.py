"""Which site a node is: with site keys, the name its key was registered under, whatever a
reply claims (a site cannot answer as another); otherwise the name the site gives."""

from __future__ import annotations

import logging

log = logging.getLogger("fedmed.coordinator")


class SiteNames:
    def __init__(self, bound: dict[int, str]) -> None:
        self.bound = bound  # node id -> the name its key was registered under
        self.names: dict[int, str] = {}  # node id -> site name, learnt from replies

    def known(self, node: int) -> bool:
        return node in self.names

    def claim(self, node: int, claimed: object) -> str:
        """The name a reply from ``node`` claiming ``claimed`` is recorded under."""
        claimed = str(claimed or "")[:100]
        name = self.bound.get(node) or claimed or self.name(node)
        if node in self.bound and claimed and claimed != name and self.names.get(node) != name:
            log.warning(
                "node %d, registered with the key of %s, answers as %r; its replies are recorded as %s",
                node,
                name,
                claimed,
                name,
            )
        self.names[node] = name
        return name

    def remember(self, node: int, name: str) -> None:
        """A name read back from the run directory on a resume."""
        self.names[node] = name

    def name(self, node: int) -> str:
        return self.bound.get(node) or self.names.get(node, f"node-{node}")
