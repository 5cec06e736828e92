// aio_config: the five DeepNVMe tuning knobs an aio_handle is built with.
#pragma once

#include <cstdint>

struct aio_config {
    int64_t _block_size;         // bytes per I/O request submitted to the kernel
    int _queue_depth;            // requests in flight per worker thread
    bool _single_submit;         // one io_submit call per request instead of one per batch
    bool _overlap_events;        // refill the queue as requests complete instead of batch by batch
    int _intra_op_parallelism;   // worker threads each request is split across
};
