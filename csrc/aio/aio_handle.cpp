// aio_handle: request submission and wait(), with the GIL released around every blocking step.
#include "aio_handle.h"

#include <pybind11/pybind11.h>

#include <exception>

#include "aio_error.h"

namespace py = pybind11;

namespace {

void check_positive(int64_t value, const char* name)
{
    if (value <= 0) {
        throw make_value_error(std::string("aio_handle ") + name + " must be positive, got " +
                                   std::to_string(value), "");
    }
}

void check_tensor(const at::Tensor& buffer, const std::string& filename, int64_t file_offset)
{
    if (!buffer.defined()) { throw make_value_error("aio: the buffer tensor is undefined", filename); }
    if (!(buffer.device().is_cpu() || buffer.device().is_cuda())) {
        throw make_value_error("aio: unsupported device " + buffer.device().str() +
                                   " (only cpu tensors, and cuda tensors through a pinned bounce buffer)",
                               filename);
    }
    if (!buffer.is_contiguous()) {
        throw make_value_error("aio: the tensor must be contiguous (call .contiguous() first); got strides " +
                                   c10::str(buffer.strides()) + " for shape " + c10::str(buffer.sizes()),
                               filename);
    }
    if (file_offset < 0) {
        throw make_value_error("aio: file_offset must be >= 0, got " + std::to_string(file_offset), filename);
    }
}

}  // namespace

aio_handle::aio_handle(int64_t block_size, int queue_depth, bool single_submit, bool overlap_events,
                       int intra_op_parallelism)
    : _config{block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism}
{
    check_positive(block_size, "block_size");
    check_positive(queue_depth, "queue_depth");
    check_positive(intra_op_parallelism, "intra_op_parallelism");
    // Every libaio context exists before any thread starts, so a failing io_setup leaves nothing running.
    for (int tid = 0; tid < intra_op_parallelism; ++tid) {
        _thread_contexts.emplace_back(new aio_thread(tid, _config));
    }
    for (auto& ctx : _thread_contexts) { _threads.emplace_back(&aio_thread::run, ctx.get()); }
}

aio_handle::~aio_handle()
{
    // Requests in flight point into tensors the ops keep alive; let them land before the threads go.
    for (; _num_pending_ops > 0; --_num_pending_ops) {
        for (auto& ctx : _thread_contexts) { ctx->pop_complete(); }
    }
    for (auto& ctx : _thread_contexts) { ctx->stop(); }
    for (auto& thread : _threads) { thread.join(); }
}

void aio_handle::warn_once(bool* warned, const std::string& message)
{
    py::gil_scoped_acquire gil;
    if (*warned) { return; }
    *warned = true;
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) { throw py::error_already_set(); }
}

int aio_handle::submit(bool read_op, const at::Tensor& buffer, const std::string& filename,
                       bool validate, bool async, int64_t file_offset)
{
    check_tensor(buffer, filename, file_offset);
    py::gil_scoped_release no_gil;
    std::lock_guard<std::mutex> lock(_api_mutex);
    auto file = aio_file::open(filename, read_op, file_offset, static_cast<int64_t>(buffer.nbytes()));
    if (!file->direct()) {
        warn_once(&_warned_buffered,
                  "aio: O_DIRECT is not available for '" + filename +
                      "' (filesystem refused it, or MOE_AIO_DISABLE_O_DIRECT is set); falling back to "
                      "buffered I/O through the page cache, which is slower. Warned once per handle.");
    }
    auto op = std::make_shared<aio_op_desc>(read_op, buffer, file, file_offset, validate,
                                            _config._intra_op_parallelism);
    for (auto& ctx : _thread_contexts) { ctx->push_work(op); }
    ++_num_pending_ops;
    if (async) { return 0; }
    return wait_locked();
}

int aio_handle::wait()
{
    py::gil_scoped_release no_gil;
    std::lock_guard<std::mutex> lock(_api_mutex);
    return wait_locked();
}

int aio_handle::wait_locked()
{
    int completed = 0;
    bool direct_refused = false;
    std::string refused_path;
    std::exception_ptr first_error;
    while (_num_pending_ops > 0) {
        std::shared_ptr<aio_op_desc> op;
        for (auto& ctx : _thread_contexts) { op = ctx->pop_complete(); }  // FIFO: the same op from each
        --_num_pending_ops;
        ++completed;
        try {
            op->finish();
        } catch (...) {
            if (!first_error) { first_error = std::current_exception(); }
        }
        if (op->_file->_direct_request_refused && !direct_refused) {
            direct_refused = true;
            refused_path = op->_file->_path;
        }
    }
    if (direct_refused) {
        warn_once(&_warned_buffered, "aio: O_DIRECT refused requests on '" + refused_path +
                                         "' (EINVAL); they were redone through the page cache. Warned once per handle.");
    }
    if (first_error) { std::rethrow_exception(first_error); }
    return completed;
}

int aio_handle::pread(const at::Tensor& buffer, const std::string& filename, bool validate,
                      bool async, int64_t file_offset)
{
    return submit(/*read_op=*/true, buffer, filename, validate, async, file_offset);
}

int aio_handle::pwrite(const at::Tensor& buffer, const std::string& filename, bool validate,
                       bool async, int64_t file_offset)
{
    return submit(/*read_op=*/false, buffer, filename, validate, async, file_offset);
}

int aio_handle::read(const at::Tensor& buffer, const std::string& filename, bool validate)
{
    return pread(buffer, filename, validate, /*async=*/false, 0);
}

int aio_handle::write(const at::Tensor& buffer, const std::string& filename, bool validate)
{
    return pwrite(buffer, filename, validate, /*async=*/false, 0);
}

int aio_handle::sync_pread(const at::Tensor& buffer, const std::string& filename, int64_t file_offset)
{
    return pread(buffer, filename, false, false, file_offset);
}

int aio_handle::sync_pwrite(const at::Tensor& buffer, const std::string& filename, int64_t file_offset)
{
    return pwrite(buffer, filename, false, false, file_offset);
}

int aio_handle::async_pread(const at::Tensor& buffer, const std::string& filename, int64_t file_offset)
{
    return pread(buffer, filename, false, true, file_offset);
}

int aio_handle::async_pwrite(const at::Tensor& buffer, const std::string& filename, int64_t file_offset)
{
    return pwrite(buffer, filename, false, true, file_offset);
}

at::Tensor aio_handle::new_cpu_locked_tensor(int64_t num_elem, const at::Tensor& example_tensor)
{
    if (num_elem < 0) {
        throw make_value_error("new_cpu_locked_tensor: num_elem must be >= 0, got " + std::to_string(num_elem), "");
    }
    bool locked = false;
    at::Tensor tensor;
    {
        py::gil_scoped_release no_gil;  // mlock faults every page in: seconds for large tensors
        tensor = _locked_tensors.alloc(num_elem, example_tensor.scalar_type(), &locked);
    }
    if (!locked) {
        warn_once(&_warned_unlocked,
                  "new_cpu_locked_tensor: mlock failed (RLIMIT_MEMLOCK, see `ulimit -l`); the tensor is "
                  "page-aligned but not page-locked. Warned once per handle.");
    }
    return tensor;
}

bool aio_handle::free_cpu_locked_tensor(const at::Tensor& tensor)
{
    return _locked_tensors.free(tensor);
}
