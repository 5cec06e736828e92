// aio_op_desc: one read or write request (host bytes, file, offset, size) shared by the worker threads.
// Plain C++ (no torch): the bindings turn a tensor into host bytes, an owner and a completion hook.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "aio_config.h"
#include "aio_context.h"
#include "aio_file.h"
#include "aligned_buffer.h"

struct aio_op_desc {
    // `data` must stay valid until finish() returns: `owner` keeps whatever holds it alive (the caller's
    // tensor and its pinned staging copy). `on_complete` runs at the end of a successful finish() (e.g. the
    // copy of a staged read back to the device); it may be empty.
    aio_op_desc(bool read_op, char* data, int64_t num_bytes, std::shared_ptr<aio_file> file, int64_t file_offset,
                bool validate, int num_threads, std::shared_ptr<void> owner, std::function<void()> on_complete);

    // Worker thread `tid` moves its slice (about num_bytes / num_threads, page-aligned boundaries).
    // Never throws: the error is kept for finish().
    void run(int tid, aio_context& ctx, const aio_config& config, std::unique_ptr<aligned_buffer>& bounce);

    // Waiting thread, once every worker ran: rethrows the first worker error; with validate=true compares
    // the file with the memory; then runs on_complete.
    void finish();

    bool _read_op;
    char* _data;  // the host bytes the workers move
    int64_t _num_bytes;
    std::shared_ptr<aio_file> _file;
    int64_t _file_offset;
    bool _validate;
    int _num_threads;
    std::shared_ptr<void> _owner;  // keeps _data alive until the op is dropped
    std::function<void()> _on_complete;
    std::mutex _error_mutex;
    std::exception_ptr _error;  // the first worker failure
};
