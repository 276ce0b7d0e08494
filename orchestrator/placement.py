"""Image-locality placement: which env host an admitted episode goes to.

Env hosts (``MEGAFLOW_ENV_HOSTS``) advertise the images they hold (envs/image_cache.py) and their sandbox slots.
With ``MEGAFLOW_PLACEMENT=locality`` an episode goes to the least loaded host that holds its image and has a free
slot, else to the least loaded host, which then pulls it; a host this admission round already sent the image to
counts as holding it (its pull is on the way), so a burst of one image does not pull it on every host.
``blind`` ignores images: the least loaded host. Load is the host's live episodes over its slots, counted from
the database (the episode's ``env_host``, set by the admission), plus what this round placed.

No hosts listed: placement is off and every episode goes to its pool's shared queue, as before.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from django.conf import settings
from django.db.models import Count

from envs import image_cache
from megaflow_site.topology import Service, WorkerSpec
from orchestrator.models import Episode
from orchestrator.transitions import LIVE


class Placer:
    """Places the episodes of one admission round of one pool."""

    def __init__(self, pool: str, policy: str | None = None):
        self.hosts = list(settings.MEGAFLOW_ENV_HOSTS)
        self.policy = policy or settings.MEGAFLOW_PLACEMENT
        self.load: Counter[str] = Counter()
        self.held: dict[str, set[str]] = defaultdict(set)
        if not self.hosts:
            return
        advertised = image_cache.host_slots()
        default = WorkerSpec.DEFAULT_CONCURRENCY[Service.ENV]
        self.slots = {host: max(1, advertised.get(host) or default) for host in self.hosts}
        live = Episode.objects.filter(status__in=LIVE, env_host__in=self.hosts, run__env_pool=pool)
        self.load.update(dict(live.values_list("env_host").annotate(n=Count("pk")).order_by()))
        if self.policy == "locality":
            self.held.update({host: image_cache.held_images(host) for host in self.hosts})

    def place(self, image: str) -> str:
        """The host for an episode of ``image`` (blank: the pool's shared queue); counts it in that host's load."""
        if not self.hosts:
            return ""
        image = image or settings.MEGAFLOW_BASE_IMAGE
        candidates = self.hosts
        if self.policy == "locality" and image != settings.MEGAFLOW_BASE_IMAGE:
            holders = [host for host in self.hosts if image in self.held[host] and self.load[host] < self.slots[host]]
            candidates = holders or self.hosts
        host = min(candidates, key=lambda h: (self.load[h] / self.slots[h], h))
        self.load[host] += 1
        self.held[host].add(image)
        return host
