// aio_file: the open descriptors (O_DIRECT and page-cache) of the one file a request reads or writes.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

struct aio_file {
    // Opens `path` for a read of `num_bytes` at `offset` (the file must exist and be long enough) or
    // for a write (created if missing, never truncated, extended to offset + num_bytes up front so
    // direct writes do not extend the file one request at a time). Throws aio_error on failure.
    static std::shared_ptr<aio_file> open(const std::string& path, bool read_op, int64_t offset,
                                          int64_t num_bytes);

    aio_file(const aio_file&) = delete;
    aio_file& operator=(const aio_file&) = delete;
    ~aio_file();  // closes both descriptors

    bool direct() const { return _direct_fd >= 0; }

    std::string _path;
    int _buffered_fd = -1;  // page-cache descriptor: unaligned heads and tails, and the fallback
    int _direct_fd = -1;    // O_DIRECT descriptor; -1 where the filesystem refused O_DIRECT
    bool _regular = true;   // a regular file (size checks and preallocation apply)
    std::atomic<bool> _direct_request_refused{false};  // a direct request got EINVAL and was redone buffered

private:
    aio_file() = default;
};
