// aio_op_desc: one read or write request (tensor, file, offset, bytes) shared by the worker threads.
#pragma once

#include <ATen/ATen.h>

#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "aio_config.h"
#include "aio_context.h"
#include "aio_file.h"
#include "aligned_buffer.h"

struct aio_op_desc {
    // Checks the tensor (contiguous; CPU, or CUDA through a pinned bounce tensor) and, for a CUDA
    // write, stages it to host memory. Throws aio_error (ValueError) on a bad tensor.
    aio_op_desc(bool read_op, const at::Tensor& buffer, std::shared_ptr<aio_file> file,
                int64_t file_offset, bool validate, int num_threads);

    // Worker thread `tid` moves its slice (about num_bytes / num_threads, page-aligned boundaries).
    // Never throws: the error is kept for finish().
    void run(int tid, aio_context& ctx, const aio_config& config, std::unique_ptr<aligned_buffer>& bounce);

    // Waiting thread, once every worker ran: rethrows the first worker error, copies a CUDA read
    // back to the device, and with validate=true compares the file with the tensor.
    void finish();

    bool _read_op;
    at::Tensor _buffer;      // the caller's tensor, kept alive until finish()
    at::Tensor _cpu_buffer;  // what the workers move: _buffer itself, or its pinned host copy
    std::shared_ptr<aio_file> _file;
    int64_t _file_offset;
    int64_t _num_bytes;
    bool _validate;
    int _num_threads;
    std::mutex _error_mutex;
    std::exception_ptr _error;  // the first worker failure
};
