"""A vLLM (v1) GPU worker whose KV cache goes through kvhygiene's eviction gate::

    vllm serve MODEL --worker-cls kvhygiene.vllm_worker.Worker --enforce-eager --gpu-memory-utilization 0.8

vLLM's scheduler, which holds no cache, frees KV blocks on paths a worker never sees, and
hands them to the next request unscrubbed. This worker claims, before every
forward pass, the blocks each scheduled request is newly given
(:func:`kvhygiene.vllm.claim_scheduled`): a block that changes owner is scrubbed and
verified first, and a step that would run a request on a block that could not be verified
clean fails (vLLM then stops the engine) rather than serve another request's keys and
values.

It needs kvhygiene as PyTorch's allocator in the worker (the package's vLLM plugin installs
it once the package is pip-installed, see :func:`kvhygiene.vllm.install_plugin`): the KV cache
must lie in memory kvhygiene allocated. ``--enforce-eager`` because CUDA graph capture fails
under any pluggable allocator; a ``--gpu-memory-utilization`` below vLLM's default (0.92), or
``--kv-cache-memory-bytes``, leaves room for freed blocks kvhygiene holds until their scrub is
verified (README, "vLLM"). Once vLLM has set up the KV cache, the worker lays it out
(:func:`kvhygiene.vllm.layouts_of_runner`) and scrubs every block once, so that the gate
knows each one clean before the first request (``KVH_KV_GATE=enforce`` refuses blocks of
unknown state); a cache it cannot lay out stops the worker there. Subclass it and override
:meth:`Worker.tenant_of_request` to claim blocks under a tenant (``KVH_KV_GATE_SCOPE=tenant``;
refused beside a KV connector that loads blocks, :func:`kvhygiene.vllm.check_kv_connector`).

Importing this module imports vLLM. It is tested against a stand-in of vLLM's worker class,
not against vLLM itself.
"""

from __future__ import annotations

import logging
from typing import Optional

from vllm.v1.worker.gpu_worker import Worker as _VllmWorker

from . import context, scrub_blocks
from .vllm import check_kv_connector, claim_scheduled, context_id, layouts_of_runner

__all__ = ["Worker"]

_log = logging.getLogger(__name__)


class Worker(_VllmWorker):
    """vLLM's GPU worker, with each step's new KV blocks claimed through the gate."""

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        layouts, block_sizes = layouts_of_runner(self.model_runner)
        # A KV connector that loads blocks writes them without a claim: refused under the
        # tenant scope, which that would defeat (check_kv_connector says why).
        check_kv_connector(getattr(self, "vllm_config", None))
        # Every group shares one layout (one block pool); scrubbing it all makes each block
        # verified clean and ownerless, the state the gate hands blocks over from. A model
        # with no KV cache has nothing to scrub or claim.
        if layouts:
            cache = layouts[0]
            scrub_blocks(cache, range(cache.blocks_per_region))
            # What an operator checks the worker's gate by (the scrub's kv_scrub record is in
            # the forensic log).
            _log.info(
                "kvhygiene: KV cache gated: %d blocks of %d bytes in %d regions on device %d, "
                "every block scrubbed and verified",
                cache.blocks_per_region,
                cache.block_bytes,
                len(cache.regions),
                cache.device,
            )
        else:
            _log.info("kvhygiene: no KV cache in this worker: nothing to gate")
        self._kvh_layouts = layouts
        self._kvh_block_sizes = block_sizes

    def tenant_of_request(self, req_id: str) -> Optional[str]:
        """The tenant of request ``req_id``, under whom its blocks are claimed: none by
        default (vLLM's requests carry no tenant)."""
        return None

    def execute_model(self, scheduler_output):
        layouts = getattr(self, "_kvh_layouts", None)
        if layouts is None:
            raise RuntimeError(
                "kvhygiene.vllm_worker: a step before the KV cache was set up "
                "(initialize_from_config): its blocks cannot be claimed"
            )
        if layouts:
            with context(model_id=self._kvh_model_id()):
                claim_scheduled(scheduler_output, layouts, self._kvh_block_sizes, tenant_of=self.tenant_of_request)
        return super().execute_model(scheduler_output)

    def _kvh_model_id(self) -> Optional[str]:
        """The model the claims' records name: the worker's model (``--model``)."""
        model = getattr(getattr(self, "model_config", None), "model", None)
        return None if model is None else context_id(model)
