// Message builders for aio_error: every message names the path, offset, byte count and errno text.
#include "aio_error.h"

#include <cstring>
#include <sstream>

aio_error make_os_error(int err, const std::string& what, const std::string& path, int64_t offset,
                        int64_t num_bytes)
{
    std::ostringstream msg;
    msg << what << " '" << path << "' at offset " << offset << " (" << num_bytes
        << " bytes): " << std::strerror(err) << " (errno " << err << ")";
    return aio_error(aio_error_kind::os_error, err, msg.str(), path);
}

aio_error make_eof_error(const std::string& path, int64_t offset, int64_t num_bytes, int64_t file_size)
{
    std::ostringstream msg;
    msg << "read of " << num_bytes << " bytes at offset " << offset << " from '" << path
        << "' needs the file to hold " << offset + num_bytes << " bytes, but it ends at byte "
        << file_size;
    return aio_error(aio_error_kind::eof_error, 0, msg.str(), path);
}

aio_error make_value_error(const std::string& message, const std::string& path)
{
    return aio_error(aio_error_kind::value_error, 0, message + " (file '" + path + "')", path);
}
