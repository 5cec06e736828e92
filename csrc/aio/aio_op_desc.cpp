// One aio request: the per-thread split and completion (validate, then the caller's hook).
#include "aio_op_desc.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "aio_error.h"
#include "aio_slice.h"
#include "aio_transfer.h"

namespace {

constexpr int64_t k_split_align = 4096;  // thread slices start on page boundaries of the file range

}  // namespace

aio_op_desc::aio_op_desc(bool read_op, char* data, int64_t num_bytes, std::shared_ptr<aio_file> file,
                         int64_t file_offset, bool validate, int num_threads, std::shared_ptr<void> owner,
                         std::function<void()> on_complete)
    : _read_op(read_op),
      _data(data),
      _num_bytes(num_bytes),
      _file(std::move(file)),
      _file_offset(file_offset),
      _validate(validate),
      _num_threads(num_threads),
      _owner(std::move(owner)),
      _on_complete(std::move(on_complete))
{
}

void aio_op_desc::run(int tid, aio_context& ctx, const aio_config& config, std::unique_ptr<aligned_buffer>& bounce)
{
    try {
        const int64_t per_thread = (_num_bytes + _num_threads - 1) / _num_threads;
        const int64_t share = (per_thread + k_split_align - 1) / k_split_align * k_split_align;
        const int64_t begin = std::min(_num_bytes, share * tid);
        const int64_t end = std::min(_num_bytes, begin + share);
        char* base = _data;
        const aio_slice slice{base + begin, _file_offset + begin, end - begin, _file_offset, _num_bytes};
        transfer_slice(_read_op, slice, *_file, config, ctx, bounce);
    } catch (...) {
        std::lock_guard<std::mutex> lock(_error_mutex);
        if (!_error) { _error = std::current_exception(); }
    }
}

void aio_op_desc::finish()
{
    if (_error) { std::rethrow_exception(_error); }
    if (_validate) {
        // Read the range back through the page cache (which direct writes keep coherent) and compare.
        std::vector<char> file_bytes(static_cast<size_t>(_num_bytes));
        // A fresh read-only descriptor: a write request's own descriptors are write-only.
        std::shared_ptr<aio_file> reader = aio_file::open(_file->_path, /*read_op=*/true, _file_offset, _num_bytes);
        int64_t done = 0;
        while (done < _num_bytes) {
            const ssize_t rc = ::pread(reader->_buffered_fd, file_bytes.data() + done,
                                       static_cast<size_t>(_num_bytes - done), _file_offset + done);
            if (rc < 0 && errno == EINTR) { continue; }
            if (rc <= 0) {
                throw make_os_error(rc < 0 ? errno : EIO, "validating (reading back)", _file->_path,
                                    _file_offset, _num_bytes);
            }
            done += rc;
        }
        if (std::memcmp(file_bytes.data(), _data, static_cast<size_t>(_num_bytes)) != 0) {
            throw make_os_error(EIO, "validation: file bytes differ from the tensor after", _file->_path,
                                _file_offset, _num_bytes);
        }
    }
    if (_on_complete) { _on_complete(); }
}
