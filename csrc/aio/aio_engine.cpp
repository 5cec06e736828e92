// aio_engine: request submission to the worker threads and wait(), in plain C++ (the bindings add the GIL).
#include "aio_engine.h"

#include <exception>

#include "aio_error.h"

namespace {

void check_positive(int64_t value, const char* name)
{
    if (value <= 0) {
        throw make_value_error(std::string("aio_handle ") + name + " must be positive, got " +
                                   std::to_string(value), "");
    }
}

const aio_config& checked(const aio_config& config)
{
    check_positive(config._block_size, "block_size");
    check_positive(config._queue_depth, "queue_depth");
    check_positive(config._intra_op_parallelism, "intra_op_parallelism");
    return config;
}

}  // namespace

aio_engine::aio_engine(const aio_config& config) : _config(checked(config))
{
    for (int tid = 0; tid < _config._intra_op_parallelism; ++tid) {
        _thread_contexts.emplace_back(new aio_thread(tid, _config));
    }
    for (auto& ctx : _thread_contexts) { _threads.emplace_back(&aio_thread::run, ctx.get()); }
}

aio_engine::~aio_engine()
{
    // Requests in flight point into memory their ops keep alive; let them land before the threads go.
    for (; _num_pending_ops > 0; --_num_pending_ops) {
        for (auto& ctx : _thread_contexts) { ctx->pop_complete(); }
    }
    for (auto& ctx : _thread_contexts) { ctx->stop(); }
    for (auto& thread : _threads) { thread.join(); }
}

aio_wait_result aio_engine::submit(aio_request request, bool then_wait,
                                   const std::function<void(bool)>& on_queued)
{
    if (request._file_offset < 0) {
        throw make_value_error("aio: file_offset must be >= 0, got " + std::to_string(request._file_offset),
                               request._filename);
    }
    std::lock_guard<std::mutex> lock(_api_mutex);
    auto file = aio_file::open(request._filename, request._read_op, request._file_offset, request._num_bytes);
    const bool buffered = !file->direct();
    auto op = std::make_shared<aio_op_desc>(request._read_op, request._data, request._num_bytes, std::move(file),
                                            request._file_offset, request._validate, _config._intra_op_parallelism,
                                            std::move(request._owner), std::move(request._on_complete));
    for (auto& ctx : _thread_contexts) { ctx->push_work(op); }
    ++_num_pending_ops;
    if (on_queued) { on_queued(buffered); }
    return then_wait ? wait_locked() : aio_wait_result{};
}

aio_wait_result aio_engine::wait()
{
    std::lock_guard<std::mutex> lock(_api_mutex);
    return wait_locked();
}

aio_wait_result aio_engine::wait_locked()
{
    aio_wait_result result;
    std::exception_ptr first_error;
    while (_num_pending_ops > 0) {
        std::shared_ptr<aio_op_desc> op;
        for (auto& ctx : _thread_contexts) { op = ctx->pop_complete(); }  // FIFO: the same op from each
        --_num_pending_ops;
        ++result._completed;
        try {
            op->finish();
        } catch (...) {
            if (!first_error) { first_error = std::current_exception(); }
        }
        if (op->_file->_direct_request_refused && result._direct_refused_path.empty()) {
            result._direct_refused_path = op->_file->_path;
        }
    }
    if (first_error) { std::rethrow_exception(first_error); }
    return result;
}
