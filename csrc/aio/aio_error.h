// aio_error: the exception every aio failure is reported with; the bindings map _kind to a Python type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

enum class aio_error_kind {
    os_error,     // a system call failed: Python OSError(errno) (FileNotFoundError, PermissionError, ...)
    eof_error,    // the file ended before the tensor was filled: Python EOFError
    value_error,  // a bad argument (non-contiguous tensor, unsupported device): Python ValueError
};

struct aio_error : public std::runtime_error {
    aio_error(aio_error_kind kind, int error_number, const std::string& message, const std::string& path)
        : std::runtime_error(message), _kind(kind), _errno(error_number), _path(path)
    {
    }

    aio_error_kind _kind;
    int _errno;         // 0 unless _kind == os_error
    std::string _path;  // the file the failing request named
};

// "<what> <path> at offset <off> (<n> bytes): <strerror(err)>" as an os_error.
aio_error make_os_error(int err, const std::string& what, const std::string& path, int64_t offset,
                        int64_t num_bytes);
// A read that hit end of file: names the path, the requested range and where the file ended.
aio_error make_eof_error(const std::string& path, int64_t offset, int64_t num_bytes, int64_t file_size);
aio_error make_value_error(const std::string& message, const std::string& path);

// A Python exception is already set (e.g. a warning the filters made an error); the bindings let it propagate.
struct python_error_set : public std::exception {
    const char* what() const noexcept override { return "a Python exception is set"; }
};
