// Moving one aio_slice between memory and a file (the per-thread I/O engine).
#pragma once

#include <memory>

#include "aio_config.h"
#include "aio_context.h"
#include "aio_file.h"
#include "aio_slice.h"
#include "aligned_buffer.h"

// Moves `slice` between memory and `file`:
//  1. the unaligned head and tail (file offsets not on a 4 KiB page) go through the page cache;
//  2. the page-aligned middle goes through libaio with O_DIRECT in block_size requests, queue_depth
//     in flight, straight from the tensor's memory when its address is 512-byte aligned relative to
//     the file offset, otherwise through `bounce` (a per-thread ring, copy overlapped with I/O);
//  3. where the file has no O_DIRECT descriptor, everything goes through the page cache.
// Throws aio_error (errno, path, offset, bytes) and never leaves a request in flight when it does.
void transfer_slice(bool read_op, const aio_slice& slice, aio_file& file, const aio_config& config,
                    aio_context& ctx, std::unique_ptr<aligned_buffer>& bounce);
