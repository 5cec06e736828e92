// The per-thread I/O engine: page-cache heads/tails plus a libaio O_DIRECT pipeline for the middle.
#include "aio_transfer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <vector>

#include "aio_error.h"

namespace {

constexpr int64_t k_offset_align = 4096;   // direct requests cover whole pages, so the page cache
                                            // (heads/tails) and O_DIRECT never share a page
constexpr uintptr_t k_memory_align = 512;   // buffer alignment O_DIRECT needs (logical block size)
// Bytes of bounce ring per thread (MOE_AIO_BOUNCE_MIB overrides, for tuning): enough requests in
// flight to keep the disk busy, small enough to stay in the last-level cache while it is copied.
int64_t bounce_budget()
{
    static const int64_t budget = [] {
        const char* value = std::getenv("MOE_AIO_BOUNCE_MIB");
        const long mib = value != nullptr ? std::atol(value) : 0;
        return static_cast<int64_t>(mib > 0 ? mib : 16) << 20;
    }();
    return budget;
}

int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
int64_t round_down(int64_t x, int64_t a) { return x / a * a; }

const char* verb(bool read_op) { return read_op ? "reading" : "writing"; }

[[noreturn]] void throw_os(int err, bool read_op, const aio_slice& slice, const aio_file& file)
{
    throw make_os_error(err, verb(read_op), file._path, slice._request_offset, slice._request_bytes);
}

// pread/pwrite exactly num_bytes through the page cache, retrying EINTR and short transfers.
void buffered_io(bool read_op, const aio_file& file, const aio_slice& slice, char* buffer,
                 int64_t offset, int64_t num_bytes)
{
    while (num_bytes > 0) {
        const size_t count = static_cast<size_t>(std::min<int64_t>(num_bytes, 1 << 30));
        const ssize_t rc = read_op ? ::pread(file._buffered_fd, buffer, count, offset)
                                   : ::pwrite(file._buffered_fd, buffer, count, offset);
        if (rc < 0) {
            if (errno == EINTR) { continue; }
            throw_os(errno, read_op, slice, file);
        }
        if (rc == 0) {
            if (!read_op) { throw_os(EIO, read_op, slice, file); }
            struct stat st;
            const int64_t size = ::fstat(file._buffered_fd, &st) == 0 ? st.st_size : offset;
            throw make_eof_error(file._path, slice._request_offset, slice._request_bytes, size);
        }
        buffer += rc;
        offset += rc;
        num_bytes -= rc;
    }
}

// Checks one direct request's result; finishes short transfers through the page cache, and redoes
// a request O_DIRECT refused (EINVAL: alignment the device does not accept) the same way.
void complete_request(bool read_op, aio_file& file, const aio_slice& slice, char* buffer,
                      int64_t offset, int64_t num_bytes, long result)
{
    if (result < 0) {
        if (-result != EINVAL) { throw_os(static_cast<int>(-result), read_op, slice, file); }
        file._direct_request_refused = true;
        buffered_io(read_op, file, slice, buffer, offset, num_bytes);
    } else if (result < num_bytes) {
        buffered_io(read_op, file, slice, buffer + result, offset + result, num_bytes - result);
    }
}

// Runs num_requests libaio requests with at most `window` in flight. prep(index, slot, iocb) fills
// request `index` into queue slot `slot`; done(index, slot, result) consumes its completion.
// refill_each_event=false is DeepNVMe's sequential mode (overlap_events=false): a new batch is
// submitted only once the whole previous batch completed. eager=true submits every request as soon
// as it is prepared and refills a slot as soon as its completion was consumed (the bounce path,
// where prep/done copy data and the disk should not wait for a whole batch of copies).
// If anything throws, the requests still in flight are reaped first: they point into memory the
// caller is about to release.
template <class Prep, class Done>
void run_requests(aio_context& ctx, int64_t num_requests, int window, bool refill_each_event,
                  bool single_submit, bool eager, const Prep& prep, const Done& done,
                  const std::function<void(int)>& fail)
{
    std::vector<int> free_slots;
    for (int slot = window - 1; slot >= 0; --slot) { free_slots.push_back(slot); }
    std::vector<int64_t> slot_request(window, -1);
    std::vector<struct iocb*> batch;
    batch.reserve(window);
    int64_t next = 0;
    int in_flight = 0;
    auto prepare = [&](int slot) {
        struct iocb* request = &ctx._iocbs[slot];
        prep(next, slot, request);  // io_prep_* clears the iocb, so data is set after
        request->data = reinterpret_cast<void*>(static_cast<intptr_t>(slot));
        slot_request[slot] = next++;
        return request;
    };
    auto submit = [&](struct iocb** requests, int n) {
        int err = 0;
        in_flight += ctx.submit(requests, n, single_submit, &err);
        if (err != 0) { fail(err); }
    };
    try {
        while (next < num_requests || in_flight > 0) {
            if (next < num_requests && (refill_each_event || in_flight == 0)) {
                batch.clear();
                while (next < num_requests && !free_slots.empty()) {
                    const int slot = free_slots.back();
                    free_slots.pop_back();
                    struct iocb* request = prepare(slot);
                    if (eager) {
                        submit(&request, 1);
                    } else {
                        batch.push_back(request);
                    }
                }
                if (!batch.empty()) { submit(batch.data(), static_cast<int>(batch.size())); }
            }
            const int count = ctx.get_events(refill_each_event ? 1 : in_flight, in_flight);
            if (count < 0) {
                in_flight = 0;  // the context is unusable; nothing more can be reaped
                fail(-count);
            }
            for (int i = 0; i < count; ++i) {
                const struct io_event& event = ctx._events[i];
                const int slot = static_cast<int>(reinterpret_cast<intptr_t>(event.data));
                --in_flight;
                done(slot_request[slot], slot, static_cast<long>(event.res));
                if (eager && next < num_requests) {
                    struct iocb* request = prepare(slot);
                    submit(&request, 1);
                } else {
                    free_slots.push_back(slot);
                }
            }
        }
    } catch (...) {
        while (in_flight > 0) {
            const int count = ctx.get_events(1, in_flight);
            if (count <= 0) { break; }
            in_flight -= count;
        }
        throw;
    }
}

// The page-aligned middle, straight from/to the tensor's memory.
void direct_io(bool read_op, aio_file& file, const aio_slice& slice, const aio_config& config,
               aio_context& ctx, char* buffer, int64_t offset, int64_t num_bytes)
{
    const int64_t block = round_up(config._block_size, k_offset_align);
    const int64_t num_requests = (num_bytes + block - 1) / block;
    auto prep = [&](int64_t index, int, struct iocb* request) {
        const int64_t start = index * block;
        const size_t count = static_cast<size_t>(std::min(block, num_bytes - start));
        if (read_op) {
            io_prep_pread(request, file._direct_fd, buffer + start, count, offset + start);
        } else {
            io_prep_pwrite(request, file._direct_fd, buffer + start, count, offset + start);
        }
    };
    auto done = [&](int64_t index, int, long result) {
        const int64_t start = index * block;
        complete_request(read_op, file, slice, buffer + start, offset + start,
                         std::min(block, num_bytes - start), result);
    };
    auto fail = [&](int err) { throw_os(err, read_op, slice, file); };
    run_requests(ctx, num_requests, ctx._queue_depth, config._overlap_events, config._single_submit,
                 /*eager=*/false,
                 prep, done, fail);
}

// The page-aligned middle of a tensor whose address O_DIRECT cannot use: each request goes through
// a slot of the thread's bounce ring. Copies overlap the requests in flight, so this path always
// refills per completion (sequential batches would serialize copying and I/O).
void bounced_io(bool read_op, aio_file& file, const aio_slice& slice, const aio_config& config,
                aio_context& ctx, std::unique_ptr<aligned_buffer>& bounce, char* buffer,
                int64_t offset, int64_t num_bytes)
{
    const int64_t block = round_up(config._block_size, k_offset_align);
    const int64_t num_requests = (num_bytes + block - 1) / block;
    const int slots = static_cast<int>(std::min<int64_t>(
        ctx._queue_depth, std::max<int64_t>(2, bounce_budget() / block)));
    const size_t ring_bytes = static_cast<size_t>(slots * block);
    if (!bounce || bounce->_num_bytes < ring_bytes) {
        bounce.reset();
        bounce.reset(new aligned_buffer(ring_bytes, /*lock=*/false));
    }
    char* ring = bounce->data();
    auto prep = [&](int64_t index, int slot, struct iocb* request) {
        const int64_t start = index * block;
        const size_t count = static_cast<size_t>(std::min(block, num_bytes - start));
        char* staging = ring + slot * block;
        if (read_op) {
            io_prep_pread(request, file._direct_fd, staging, count, offset + start);
        } else {
            std::memcpy(staging, buffer + start, count);
            io_prep_pwrite(request, file._direct_fd, staging, count, offset + start);
        }
    };
    auto done = [&](int64_t index, int slot, long result) {
        const int64_t start = index * block;
        const int64_t count = std::min(block, num_bytes - start);
        char* staging = ring + slot * block;
        complete_request(read_op, file, slice, staging, offset + start, count, result);
        if (read_op) { std::memcpy(buffer + start, staging, static_cast<size_t>(count)); }
    };
    auto fail = [&](int err) { throw_os(err, read_op, slice, file); };
    run_requests(ctx, num_requests, slots, /*refill_each_event=*/true, config._single_submit,
                 /*eager=*/true, prep,
                 done, fail);
}

}  // namespace

void transfer_slice(bool read_op, const aio_slice& slice, aio_file& file, const aio_config& config,
                    aio_context& ctx, std::unique_ptr<aligned_buffer>& bounce)
{
    if (slice._num_bytes == 0) { return; }
    if (!file.direct()) {
        buffered_io(read_op, file, slice, slice._buffer, slice._file_offset, slice._num_bytes);
        return;
    }
    const int64_t begin = slice._file_offset;
    const int64_t end = begin + slice._num_bytes;
    const int64_t middle_begin = std::min(round_up(begin, k_offset_align), end);
    const int64_t middle_end = std::max(round_down(end, k_offset_align), middle_begin);
    char* const middle = slice._buffer + (middle_begin - begin);

    if (middle_begin > begin) {
        buffered_io(read_op, file, slice, slice._buffer, begin, middle_begin - begin);
    }
    if (middle_end > middle_begin) {
        if (reinterpret_cast<uintptr_t>(middle) % k_memory_align == 0) {
            direct_io(read_op, file, slice, config, ctx, middle, middle_begin, middle_end - middle_begin);
        } else {
            bounced_io(read_op, file, slice, config, ctx, bounce, middle, middle_begin,
                       middle_end - middle_begin);
        }
    }
    if (end > middle_end) {
        buffered_io(read_op, file, slice, slice._buffer + (middle_end - begin), middle_end, end - middle_end);
    }
}
