// Python bindings of aio_handle (module moe.ops._aio): names, keyword defaults, docstrings only.
#include <torch/csrc/utils/pybind.h>  // the at::Tensor caster; lighter than torch/extension.h

#include "aio_error.h"
#include "aio_handle.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "DeepNVMe-compatible asynchronous file I/O for tensors (libaio + O_DIRECT).";

    py::register_local_exception_translator([](std::exception_ptr p) {
        try {
            if (p) { std::rethrow_exception(p); }
        } catch (const python_error_set&) {
            // the Python error indicator is already set (a warning turned into an error); raise it as it is
        } catch (const aio_error& e) {
            if (e._kind == aio_error_kind::os_error) {
                // OSError(errno, msg) becomes FileNotFoundError, PermissionError, ... by errno.
                py::object args = py::make_tuple(e._errno, e.what());
                PyErr_SetObject(PyExc_OSError, args.ptr());
            } else if (e._kind == aio_error_kind::eof_error) {
                PyErr_SetString(PyExc_EOFError, e.what());
            } else {
                PyErr_SetString(PyExc_ValueError, e.what());
            }
        }
    });

    py::class_<aio_handle>(m, "aio_handle",
                           "Asynchronous tensor file I/O: each request split across intra_op_parallelism "
                           "threads, queue_depth libaio requests of block_size bytes in flight per thread.")
        .def(py::init<int64_t, int, bool, bool, int>(), "Create a handle and start its worker threads.",
             py::arg("block_size") = 1048576, py::arg("queue_depth") = 128,
             py::arg("single_submit") = false, py::arg("overlap_events") = false,
             py::arg("intra_op_parallelism") = 1)
        .def("get_block_size", &aio_handle::get_block_size, "Bytes per I/O request.")
        .def("get_queue_depth", &aio_handle::get_queue_depth, "Requests in flight per thread.")
        .def("get_single_submit", &aio_handle::get_single_submit, "One io_submit per request.")
        .def("get_overlap_events", &aio_handle::get_overlap_events, "Refill the queue per completion.")
        .def("get_intra_op_parallelism", &aio_handle::get_intra_op_parallelism, "Worker threads per request.")
        .def("read", &aio_handle::read, "Synchronous read of the whole tensor from offset 0; returns wait()'s count.",
             py::arg("buffer"), py::arg("filename"), py::arg("validate") = false)
        .def("write", &aio_handle::write, "Synchronous write of the whole tensor at offset 0; returns wait()'s count.",
             py::arg("buffer"), py::arg("filename"), py::arg("validate") = false)
        .def("pread", &aio_handle::pread,
             "Read buffer.nbytes() bytes at file_offset into buffer. async=False waits for all pending "
             "requests and returns their count; async=True returns 0 (call wait()).",
             py::arg("buffer"), py::arg("filename"), py::arg("validate"), py::arg("async"),
             py::arg("file_offset") = 0)
        .def("pwrite", &aio_handle::pwrite,
             "Write buffer's bytes at file_offset (file created, not truncated). async as for pread.",
             py::arg("buffer"), py::arg("filename"), py::arg("validate"), py::arg("async"),
             py::arg("file_offset") = 0)
        .def("sync_pread", &aio_handle::sync_pread, "pread(validate=False, async=False).",
             py::arg("buffer"), py::arg("filename"), py::arg("file_offset") = 0)
        .def("sync_pwrite", &aio_handle::sync_pwrite, "pwrite(validate=False, async=False).",
             py::arg("buffer"), py::arg("filename"), py::arg("file_offset") = 0)
        .def("async_pread", &aio_handle::async_pread, "pread(validate=False, async=True).",
             py::arg("buffer"), py::arg("filename"), py::arg("file_offset") = 0)
        .def("async_pwrite", &aio_handle::async_pwrite, "pwrite(validate=False, async=True).",
             py::arg("buffer"), py::arg("filename"), py::arg("file_offset") = 0)
        .def("wait", &aio_handle::wait,
             "Wait for every pending request; returns how many completed (0 if none). Raises the first "
             "failure once all of them completed.")
        .def("new_cpu_locked_tensor", &aio_handle::new_cpu_locked_tensor,
             "A 1-D page-aligned, page-locked CPU tensor of num_elem elements of example_tensor's dtype.",
             py::arg("num_elem"), py::arg("example_tensor"))
        .def("free_cpu_locked_tensor", &aio_handle::free_cpu_locked_tensor,
             "Release a tensor from new_cpu_locked_tensor (memory goes with its last reference); "
             "returns False for any other tensor.",
             py::arg("tensor"));
}
