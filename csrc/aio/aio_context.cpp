// libaio glue: io_setup/io_submit/io_getevents with errno handling (libaio returns -errno).
#include "aio_context.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "aio_error.h"

aio_context::aio_context(int queue_depth)
    : _queue_depth(queue_depth), _iocbs(queue_depth), _events(queue_depth)
{
    const int rc = io_setup(queue_depth, &_ctx);
    if (rc < 0) {
        _ctx = nullptr;
        const std::string msg = std::string("io_setup(queue_depth=") + std::to_string(queue_depth) +
                                ") failed: " + std::strerror(-rc) +
                                "; lower queue_depth or raise /proc/sys/fs/aio-max-nr";
        throw aio_error(aio_error_kind::os_error, -rc, msg, "");
    }
}

aio_context::~aio_context()
{
    if (_ctx != nullptr) { io_destroy(_ctx); }
}

int aio_context::submit(struct iocb** requests, int n, bool single_submit, int* error)
{
    *error = 0;
    int done = 0;
    while (done < n) {
        const int count = single_submit ? 1 : n - done;
        const int rc = io_submit(_ctx, count, requests + done);
        if (rc == -EINTR) { continue; }
        if (rc < 0) {
            *error = -rc;
            break;
        }
        if (rc == 0) {  // the kernel took nothing and said nothing: treat as "try again later"
            *error = EAGAIN;
            break;
        }
        done += rc;
    }
    return done;
}

int aio_context::get_events(int min_nr, int max_nr)
{
    int rc;
    do { rc = io_getevents(_ctx, min_nr, max_nr, _events.data(), nullptr); } while (rc == -EINTR);
    return rc;
}

int aio_context::poll_events(int max_nr)
{
    struct timespec zero = {0, 0};
    int rc;
    do { rc = io_getevents(_ctx, 0, max_nr, _events.data(), &zero); } while (rc == -EINTR);
    return rc;
}
