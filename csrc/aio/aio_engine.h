// aio_engine: the plain C++ core of an aio_handle (config, worker threads, submit and wait); no torch, no Python.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "aio_config.h"
#include "aio_op_desc.h"
#include "aio_thread.h"

// What a caller asks to move: host bytes, kept alive by `owner` until the request completed.
struct aio_request {
    bool _read_op;
    char* _data;
    int64_t _num_bytes;
    std::string _filename;
    int64_t _file_offset;
    bool _validate;
    std::shared_ptr<void> _owner;       // holds the memory behind _data (may be null for caller-owned memory)
    std::function<void()> _on_complete;  // runs after a successful completion (may be empty)
};

// What submit() and wait() report besides exceptions, for the caller to warn about once.
struct aio_wait_result {
    int _completed = 0;                // requests that completed
    std::string _direct_refused_path;  // a completed request's file refused O_DIRECT requests (EINVAL), or ""
};

struct aio_engine {
    // Throws aio_error (value_error) on a non-positive setting, (os_error) when io_setup fails; every libaio
    // context exists before any thread starts, so a failure leaves nothing running.
    explicit aio_engine(const aio_config& config);
    aio_engine(const aio_engine&) = delete;
    aio_engine& operator=(const aio_engine&) = delete;
    ~aio_engine();  // waits for requests still in flight (their errors are dropped), joins the threads

    // Opens the file and queues the request on every worker, then calls `on_queued(buffered)` (buffered: the
    // file has no O_DIRECT descriptor; may be empty), then with `then_wait` waits for every pending request (the
    // count is in the result). Thread-safe: one submit or wait at a time, on_queued included.
    aio_wait_result submit(aio_request request, bool then_wait, const std::function<void(bool)>& on_queued);
    // Waits for every pending request; after all of them completed, rethrows the first failure among them.
    aio_wait_result wait();

    const aio_config _config;

private:
    aio_wait_result wait_locked();  // wait() with _api_mutex held

    std::vector<std::unique_ptr<aio_thread>> _thread_contexts;
    std::vector<std::thread> _threads;
    int _num_pending_ops = 0;  // guarded by _api_mutex
    std::mutex _api_mutex;
};
