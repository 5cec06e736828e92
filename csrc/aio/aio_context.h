// aio_context: one worker thread's libaio context (io_setup) with its request and event arrays.
#pragma once

#include <libaio.h>

#include <vector>

struct aio_context {
    // io_setup(queue_depth); throws aio_error naming /proc/sys/fs/aio-max-nr when the kernel refuses.
    explicit aio_context(int queue_depth);
    aio_context(const aio_context&) = delete;
    aio_context& operator=(const aio_context&) = delete;
    ~aio_context();  // io_destroy

    // Submits requests[0, n): all at once, or one io_submit per request when single_submit.
    // Returns how many were accepted; sets *error to the errno that stopped it (0 when all went).
    int submit(struct iocb** requests, int n, bool single_submit, int* error);
    // Waits for at least min_nr and at most max_nr completions into _events (retries EINTR).
    // Returns the count, or -errno.
    int get_events(int min_nr, int max_nr);
    // Takes the completions already there (at most max_nr) into _events without waiting.
    // Returns the count, or -errno.
    int poll_events(int max_nr);

    io_context_t _ctx = nullptr;
    int _queue_depth;
    std::vector<struct iocb> _iocbs;       // one per queue slot
    std::vector<struct io_event> _events;  // completions of the last get_events
};
