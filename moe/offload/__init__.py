"""NVMe expert offload: an expert store on disk; at inference a cache under a byte budget and a gate prefetcher; in
training the swap pipeline that keeps the experts' optimizer state on disk."""
from moe.offload.cache import ExpertCache
from moe.offload.config import OffloadConfig, OptimizerOffloadConfig, parse_bytes
from moe.offload.experts import OffloadedExperts
from moe.offload.prefetch import GatePrefetcher
from moe.offload.store import ExpertStore, OffloadError, open_training_store, write_store
from moe.offload.swap import StateSwapper, SwapStats

__all__ = ["ExpertCache", "ExpertStore", "GatePrefetcher", "OffloadConfig", "OffloadError", "OffloadedExperts",
           "OptimizerOffloadConfig", "StateSwapper", "SwapStats",
           "open_training_store", "parse_bytes", "write_store"]
