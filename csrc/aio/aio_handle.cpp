// aio_handle: tensor checks, CUDA staging through pinned host memory, and the GIL around the aio_engine.
#include "aio_handle.h"

#include <Python.h>  // only the GIL and warnings: pybind11 stays in the bindings unit

#include <ATen/ops/empty.h>
#include <c10/util/StringUtil.h>

#include <memory>
#include <utility>

#include "aio_error.h"

namespace {

// Releases the GIL for its lifetime (pybind11's gil_scoped_release, without pybind11's headers).
struct gil_release {
    gil_release() : _state(PyEval_SaveThread()) {}
    ~gil_release() { PyEval_RestoreThread(_state); }
    gil_release(const gil_release&) = delete;
    gil_release& operator=(const gil_release&) = delete;
    PyThreadState* _state;
};

// Holds the GIL for its lifetime (from any thread).
struct gil_acquire {
    gil_acquire() : _state(PyGILState_Ensure()) {}
    ~gil_acquire() { PyGILState_Release(_state); }
    gil_acquire(const gil_acquire&) = delete;
    gil_acquire& operator=(const gil_acquire&) = delete;
    PyGILState_STATE _state;
};

void check_tensor(const at::Tensor& buffer, const std::string& filename)
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
}

// The tensors a request keeps alive until it completed: the caller's, and its pinned host copy for CUDA.
struct request_tensors {
    at::Tensor _buffer;
    at::Tensor _host;
};

}  // namespace

aio_handle::aio_handle(int64_t block_size, int queue_depth, bool single_submit, bool overlap_events,
                       int intra_op_parallelism)
    : _engine(aio_config{block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism})
{
}

aio_handle::~aio_handle() = default;

void aio_handle::warn_once(bool* warned, const std::string& message)
{
    gil_acquire gil;
    if (*warned) { return; }
    *warned = true;
    // -1: the warning filter turned it into an exception, which stays set for the bindings to raise
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) { throw python_error_set(); }
}

void aio_handle::warn_buffered(const std::string& filename)
{
    warn_once(&_warned_buffered,
              "aio: O_DIRECT is not available for '" + filename +
                  "' (filesystem refused it, or MOE_AIO_DISABLE_O_DIRECT is set); falling back to "
                  "buffered I/O through the page cache, which is slower. Warned once per handle.");
}

int aio_handle::report(const aio_wait_result& result)
{
    if (!result._direct_refused_path.empty()) {
        warn_once(&_warned_buffered, "aio: O_DIRECT refused requests on '" + result._direct_refused_path +
                                         "' (EINVAL); they were redone through the page cache. Warned once per handle.");
    }
    return result._completed;
}

int aio_handle::submit(bool read_op, const at::Tensor& buffer, const std::string& filename,
                       bool validate, bool async, int64_t file_offset)
{
    check_tensor(buffer, filename);
    auto tensors = std::make_shared<request_tensors>();
    tensors->_buffer = buffer;
    tensors->_host = buffer;
    std::function<void()> on_complete;
    const auto num_bytes = static_cast<int64_t>(buffer.nbytes());
    if (buffer.is_cuda()) {
        // Pinned host staging: the device copy is one DMA, and the file side stays plain CPU memory.
        tensors->_host = at::empty({num_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
        if (!read_op) {
            tensors->_host.copy_(buffer.view({-1}).view(at::kByte));
        } else {
            request_tensors* t = tensors.get();  // owned by the request, alive while its hook runs
            on_complete = [t]() { t->_buffer.view({-1}).view(at::kByte).copy_(t->_host); };
        }
    }
    char* data = static_cast<char*>(tensors->_host.data_ptr());
    aio_request request{read_op, data, num_bytes, filename, file_offset, validate, std::move(tensors),
                        std::move(on_complete)};
    aio_wait_result result;
    {
        gil_release no_gil;
        result = _engine.submit(std::move(request), /*then_wait=*/!async, [this, &filename](bool buffered) {
            if (buffered) { warn_buffered(filename); }
        });
    }
    const int completed = report(result);
    return async ? 0 : completed;
}

int aio_handle::wait()
{
    aio_wait_result result;
    {
        gil_release no_gil;
        result = _engine.wait();
    }
    return report(result);
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
        gil_release no_gil;  // mlock faults every page in: seconds for large tensors
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
