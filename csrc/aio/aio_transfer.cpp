// The per-thread I/O engine: page-cache heads/tails plus a libaio O_DIRECT pipeline for the middle.
#include "aio_transfer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <vector>

#include "aio_error.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

// After a failure: reap what is still in flight so no request completes into freed memory.
void drain_in_flight(aio_context& ctx, int in_flight) {
    while (in_flight > 0) {
        const int count = ctx.get_events(1, in_flight);
        if (count <= 0) { break; }
        in_flight -= count;
    }
}

constexpr int64_t k_offset_align = 4096;   // direct requests cover whole pages, so the page cache
                                            // (heads/tails) and O_DIRECT never share a page
constexpr uintptr_t k_memory_align = 512;   // buffer alignment O_DIRECT needs (logical block size)
// Most bytes of bounce ring per thread (MOE_AIO_BOUNCE_MIB overrides, for tuning). The ring holds
// queue_depth requests in flight plus a quarter spare (see bounced_io): a misaligned tensor keeps
// as many bytes in flight as a locked one (the disk needs ~64-128 MiB in flight for full speed).
// By default the threads of a handle share at most 256 MiB (at least 16 MiB each). The ring is
// allocated on the first misaligned transfer and kept by the worker thread.
int64_t bounce_budget(int num_threads)
{
    static const long override_mib = [] {
        const char* value = std::getenv("MOE_AIO_BOUNCE_MIB");
        return value != nullptr ? std::atol(value) : 0L;
    }();
    if (override_mib > 0) { return static_cast<int64_t>(override_mib) << 20; }
    return std::max<int64_t>(int64_t{16} << 20, (int64_t{256} << 20) / std::max(1, num_threads));
}

// memcpy for the bounce ring: large chunks are copied with non-temporal (streaming) stores, which
// neither read the destination lines first nor evict the cache; the bytes go to or come from the
// disk (or a tensor far larger than the cache) anyway. About 1.5x memcpy's speed on large rings.
void copy_stream(char* dst, const char* src, size_t n)
{
#if defined(__SSE2__)
    constexpr size_t k_min_stream = 64 << 10;
    if (n < k_min_stream) {
        std::memcpy(dst, src, n);
        return;
    }
    const size_t head = (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16;  // align the stores
    std::memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    const size_t body = n / 64 * 64;
    for (size_t i = 0; i < body; i += 64) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
        const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    _mm_sfence();  // the streamed bytes are globally visible before io_submit hands them to the disk
    std::memcpy(dst + body, src + body, n - body);
#else
    std::memcpy(dst, src, n);
#endif
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
// submitted only once the whole previous batch completed.
// If anything throws, the requests still in flight are reaped first: they point into memory the
// caller is about to release.
template <class Prep, class Done>
void run_requests(aio_context& ctx, int64_t num_requests, int window, bool refill_each_event,
                  bool single_submit, const Prep& prep, const Done& done,
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
                    batch.push_back(prepare(slot));
                }
                if (!batch.empty()) { submit(batch.data(), static_cast<int>(batch.size())); }
            }
            const int count = ctx.get_events(refill_each_event ? 1 : in_flight, in_flight);
            if (count < 0) {
                in_flight = 0;  // the context is unusable; nothing more can be reaped
                fail(-count);
            }
            in_flight -= count;  // all reaped, even if done() throws for one of them
            for (int i = 0; i < count; ++i) {
                const struct io_event& event = ctx._events[i];
                const int slot = static_cast<int>(reinterpret_cast<intptr_t>(event.data));
                done(slot_request[slot], slot, static_cast<long>(event.res));
                free_slots.push_back(slot);
            }
        }
    } catch (...) {
        drain_in_flight(ctx, in_flight);
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
                 prep, done, fail);
}

// The page-aligned middle of a tensor whose address O_DIRECT cannot use goes through the thread's
// bounce ring. The ring is cut into slots of several block_size requests (about k_slot_bytes): a
// slot is copied in one go and its requests submitted in one io_submit, so the block layer merges
// them into large device requests (submitted one by one, 1 MiB requests cost a misaligned tensor
// ~5-10% of the disk's write speed). The ring has spare slots beyond those in flight (`window`
// requests): they are copied ahead, so a finished slot is answered at once by submitting one that
// is already ready (a write slot filled, a read slot drained), and the copies of the slots the
// completions freed run while the disk works on a full queue. Between two copies the thread polls
// for completions, so bursts of completions never leave the disk short of requests. Always refills
// as slots finish (sequential batches would serialize copying and I/O).
constexpr int64_t k_slot_bytes = 4 << 20;

void bounced_io(bool read_op, aio_file& file, const aio_slice& slice, const aio_config& config,
                aio_context& ctx, std::unique_ptr<aligned_buffer>& bounce, char* buffer,
                int64_t offset, int64_t num_bytes)
{
    const int64_t block = round_up(config._block_size, k_offset_align);  // bytes per request
    const int queue_depth = ctx._queue_depth;
    const int per_slot = static_cast<int>(std::clamp<int64_t>(k_slot_bytes / block, 1, queue_depth));
    const int64_t slot_bytes = per_slot * block;
    const int64_t num_jobs = (num_bytes + slot_bytes - 1) / slot_bytes;  // slot fills, in order
    // Slots: the budget, at most what can be used (queue_depth requests in flight plus a quarter of
    // that spare), never more than the jobs, at least 2. A fifth of them are spare (copied ahead), so
    // with the default budget as many requests are in flight as for a locked tensor (queue_depth).
    const int64_t flight_slots = std::max(1, queue_depth / per_slot);
    const int64_t max_slots = flight_slots + std::max<int64_t>(1, flight_slots / 4);
    const int slots = static_cast<int>(std::max<int64_t>(
        2, std::min({bounce_budget(config._intra_op_parallelism) / slot_bytes, max_slots, num_jobs})));
    const int window_slots = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(flight_slots, slots - std::max(1, slots / 5))));
    const size_t ring_bytes = static_cast<size_t>(slots * slot_bytes);
    if (!bounce || bounce->_num_bytes < ring_bytes) {
        bounce.reset();
        bounce.reset(new aligned_buffer(ring_bytes, /*lock=*/false));
    }
    char* ring = bounce->data();
    std::vector<struct iocb> iocbs(static_cast<size_t>(slots) * per_slot);
    std::vector<int64_t> slot_job(static_cast<size_t>(slots), -1);
    std::vector<int> slot_pending(static_cast<size_t>(slots), 0);  // its requests not yet completed
    // write: `ready` holds filled slots (iocbs prepared), `to_copy` free slots to fill next.
    // read: `ready` holds drained (empty) slots, `to_copy` completed slots to drain into the tensor.
    std::deque<int> ready;
    std::vector<int> to_copy;
    for (int slot = slots - 1; slot >= 0; --slot) {
        if (read_op) {
            ready.push_back(slot);
        } else {
            to_copy.push_back(slot);
        }
    }
    std::vector<struct iocb*> batch;
    batch.reserve(iocbs.size());
    int64_t next = 0;     // next job to fill (write) or to submit (read)
    int in_flight = 0;    // requests
    int busy_slots = 0;   // slots with requests in flight
    auto fail = [&](int err) { throw_os(err, read_op, slice, file); };
    auto job_bytes = [&](int64_t job) { return std::min(slot_bytes, num_bytes - job * slot_bytes); };
    auto job_requests = [&](int64_t job) { return static_cast<int>((job_bytes(job) + block - 1) / block); };
    auto prep = [&](int slot) {
        const int64_t job = next++;
        slot_job[slot] = job;
        char* staging = ring + slot * slot_bytes;
        const int64_t bytes = job_bytes(job);
        const int64_t file_offset = offset + job * slot_bytes;
        if (!read_op) { copy_stream(staging, buffer + job * slot_bytes, static_cast<size_t>(bytes)); }
        for (int r = 0; r < job_requests(job); ++r) {
            struct iocb* request = &iocbs[static_cast<size_t>(slot) * per_slot + r];
            const size_t count = static_cast<size_t>(std::min(block, bytes - r * block));
            if (read_op) {
                io_prep_pread(request, file._direct_fd, staging + r * block, count, file_offset + r * block);
            } else {
                io_prep_pwrite(request, file._direct_fd, staging + r * block, count, file_offset + r * block);
            }
            request->data = reinterpret_cast<void*>(static_cast<intptr_t>(slot * per_slot + r));
        }
    };
    auto reap = [&](int count) {
        if (count < 0) {
            in_flight = 0;  // the context is unusable; nothing more can be reaped
            fail(-count);
        }
        in_flight -= count;  // all reaped, even if complete_request throws for one of them
        for (int i = 0; i < count; ++i) {
            const struct io_event& event = ctx._events[i];
            const int id = static_cast<int>(reinterpret_cast<intptr_t>(event.data));
            const int slot = id / per_slot;
            const int r = id % per_slot;
            const int64_t job = slot_job[slot];
            const int64_t bytes = job_bytes(job);
            complete_request(read_op, file, slice, ring + slot * slot_bytes + r * block,
                             offset + job * slot_bytes + r * block, std::min(block, bytes - r * block),
                             static_cast<long>(event.res));
            if (--slot_pending[slot] == 0) {
                --busy_slots;
                to_copy.push_back(slot);
            }
        }
    };
    try {
        while (true) {
            // 1. Top the queue up from the ready slots, all their requests in one submission.
            batch.clear();
            while (busy_slots < window_slots && !ready.empty() && (!read_op || next < num_jobs)) {
                const int slot = ready.front();
                ready.pop_front();
                if (read_op) { prep(slot); }
                const int n = job_requests(slot_job[slot]);
                for (int r = 0; r < n; ++r) { batch.push_back(&iocbs[static_cast<size_t>(slot) * per_slot + r]); }
                slot_pending[slot] = n;
                ++busy_slots;
            }
            if (!batch.empty()) {
                int err = 0;
                const int submitted = ctx.submit(batch.data(), static_cast<int>(batch.size()),
                                                 config._single_submit, &err);
                in_flight += submitted;
                if (err != 0) {
                    // Requests the kernel did not take never complete: forget them before failing.
                    for (size_t i = static_cast<size_t>(submitted); i < batch.size(); ++i) {
                        const int id = static_cast<int>(reinterpret_cast<intptr_t>(batch[i]->data));
                        --slot_pending[id / per_slot];
                    }
                    fail(err);
                }
            }
            // 2. One copy (fill a free slot / drain a completed one), then a poll for completions.
            const bool copy_work = read_op ? !to_copy.empty() : (!to_copy.empty() && next < num_jobs);
            if (copy_work) {
                const int slot = to_copy.back();
                to_copy.pop_back();
                if (read_op) {
                    const int64_t job = slot_job[slot];
                    copy_stream(buffer + job * slot_bytes, ring + slot * slot_bytes,
                                static_cast<size_t>(job_bytes(job)));
                } else {
                    prep(slot);
                }
                ready.push_back(slot);
                if (in_flight > 0) { reap(ctx.poll_events(in_flight)); }
                continue;
            }
            // 3. Nothing to copy: wait for a completion, or stop when nothing is left in flight.
            if (in_flight == 0) {
                if (!ready.empty() && (!read_op || next < num_jobs)) { continue; }
                break;
            }
            reap(ctx.get_events(1, in_flight));
        }
    } catch (...) {
        drain_in_flight(ctx, in_flight);
        throw;
    }
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
