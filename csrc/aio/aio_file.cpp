// Opening files for aio requests: errno-named errors, O_DIRECT with a buffered fallback, preallocation.
#include "aio_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "aio_error.h"

namespace {

// MOE_AIO_DISABLE_O_DIRECT=1 behaves as if the filesystem refused O_DIRECT (tests, debugging).
bool o_direct_disabled()
{
    const char* value = std::getenv("MOE_AIO_DISABLE_O_DIRECT");
    return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

int open_retry(const char* path, int flags, mode_t mode)
{
    int fd;
    do { fd = ::open(path, flags | O_CLOEXEC, mode); } while (fd < 0 && errno == EINTR);
    return fd;
}

}  // namespace

aio_file::~aio_file()
{
    if (_direct_fd >= 0) { ::close(_direct_fd); }
    if (_buffered_fd >= 0) { ::close(_buffered_fd); }
}

std::shared_ptr<aio_file> aio_file::open(const std::string& path, bool read_op, int64_t offset,
                                         int64_t num_bytes)
{
    std::shared_ptr<aio_file> file(new aio_file());
    file->_path = path;
    const char* what = read_op ? "opening for read" : "opening for write";
    const int flags = read_op ? O_RDONLY : (O_WRONLY | O_CREAT);
    file->_buffered_fd = open_retry(path.c_str(), flags, 0644);
    if (file->_buffered_fd < 0) { throw make_os_error(errno, what, path, offset, num_bytes); }

    struct stat st;
    if (::fstat(file->_buffered_fd, &st) != 0) {
        throw make_os_error(errno, "stat of", path, offset, num_bytes);
    }
    if (S_ISDIR(st.st_mode)) { throw make_os_error(EISDIR, what, path, offset, num_bytes); }
    file->_regular = S_ISREG(st.st_mode);
    const int64_t end = offset + num_bytes;
    if (read_op && file->_regular && st.st_size < end) {
        throw make_eof_error(path, offset, num_bytes, st.st_size);
    }
    if (!read_op && file->_regular && st.st_size < end && num_bytes > 0) {
        // Preallocating reports ENOSPC before any byte moves and keeps direct writes non-extending.
        // fallocate, not posix_fallocate: the latter emulates unsupported filesystems by writing zeros.
        int rc;
        do { rc = ::fallocate(file->_buffered_fd, 0, offset, num_bytes); } while (rc != 0 && errno == EINTR);
        const int err = rc == 0 ? 0 : errno;
        if (err == ENOSPC || err == EFBIG || err == EDQUOT) {
            throw make_os_error(err, "preallocating for write", path, offset, num_bytes);
        }
        if (err != 0 && ::ftruncate(file->_buffered_fd, end) != 0) {
            throw make_os_error(errno, "extending for write", path, offset, num_bytes);
        }
    }

    if (!o_direct_disabled()) {
        // O_DIRECT is opened second so that EINVAL (tmpfs on old kernels, FUSE, ...) only means
        // "no direct I/O here": missing files and permissions were already reported above.
        file->_direct_fd = open_retry(path.c_str(), (read_op ? O_RDONLY : O_WRONLY) | O_DIRECT, 0);
        if (file->_direct_fd < 0 && errno != EINVAL) {
            throw make_os_error(errno, read_op ? "opening (O_DIRECT) for read" : "opening (O_DIRECT) for write",
                                path, offset, num_bytes);
        }
    }
    return file;
}
