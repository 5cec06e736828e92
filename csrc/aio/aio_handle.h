// aio_handle: the DeepNVMe-compatible Python-facing handle: tensors in, host bytes to the aio_engine, GIL released.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "aio_config.h"
#include "aio_engine.h"
#include "locked_tensor_mgr.h"

struct aio_handle {
    // Throws aio_error (ValueError) on a non-positive setting, (OSError) when io_setup fails.
    aio_handle(int64_t block_size, int queue_depth, bool single_submit, bool overlap_events,
               int intra_op_parallelism);
    aio_handle(const aio_handle&) = delete;
    aio_handle& operator=(const aio_handle&) = delete;
    ~aio_handle();  // the engine waits for requests still in flight (GIL released), joins its threads

    int64_t get_block_size() const { return _engine._config._block_size; }
    int get_queue_depth() const { return _engine._config._queue_depth; }
    bool get_single_submit() const { return _engine._config._single_submit; }
    bool get_overlap_events() const { return _engine._config._overlap_events; }
    int get_intra_op_parallelism() const { return _engine._config._intra_op_parallelism; }

    // Reads buffer.nbytes() bytes at file_offset of `filename` into `buffer` (or writes them).
    // async=false waits for every pending request and returns wait()'s count; async=true returns 0.
    // These release the GIL while they open files, move bytes and wait.
    int pread(const at::Tensor& buffer, const std::string& filename, bool validate, bool async,
              int64_t file_offset);
    int pwrite(const at::Tensor& buffer, const std::string& filename, bool validate, bool async,
               int64_t file_offset);
    int read(const at::Tensor& buffer, const std::string& filename, bool validate);
    int write(const at::Tensor& buffer, const std::string& filename, bool validate);
    int sync_pread(const at::Tensor& buffer, const std::string& filename, int64_t file_offset);
    int sync_pwrite(const at::Tensor& buffer, const std::string& filename, int64_t file_offset);
    int async_pread(const at::Tensor& buffer, const std::string& filename, int64_t file_offset);
    int async_pwrite(const at::Tensor& buffer, const std::string& filename, int64_t file_offset);

    // Waits for every pending request; returns how many completed (0 when none was pending).
    // After all of them completed, rethrows the first failure among them.
    int wait();

    at::Tensor new_cpu_locked_tensor(int64_t num_elem, const at::Tensor& example_tensor);
    bool free_cpu_locked_tensor(const at::Tensor& tensor);

    aio_engine _engine;
    locked_tensor_mgr _locked_tensors;
    bool _warned_buffered = false;
    bool _warned_unlocked = false;

private:
    int submit(bool read_op, const at::Tensor& buffer, const std::string& filename, bool validate,
               bool async, int64_t file_offset);
    void warn_buffered(const std::string& filename);     // the file has no O_DIRECT descriptor (takes the GIL)
    int report(const aio_wait_result& result);           // O_DIRECT refusals seen by a wait (takes the GIL)
    void warn_once(bool* warned, const std::string& message);  // Python RuntimeWarning (takes the GIL)
};
