"""NVMe expert offload at inference: an expert store on disk, a cache under a byte budget, a gate prefetcher."""
from moe.offload.cache import ExpertCache
from moe.offload.config import OffloadConfig, parse_bytes
from moe.offload.experts import OffloadedExperts
from moe.offload.prefetch import GatePrefetcher
from moe.offload.store import ExpertStore, OffloadError, write_store

__all__ = ["ExpertCache", "ExpertStore", "GatePrefetcher", "OffloadConfig", "OffloadError", "OffloadedExperts",
           "parse_bytes", "write_store"]
