// aio_thread: one worker: takes requests from its work queue, runs its slice, posts them as complete.
#pragma once

#include <deque>
#include <memory>

#include "aio_config.h"
#include "aio_context.h"
#include "aio_op_desc.h"
#include "aio_thread_sync.h"
#include "aligned_buffer.h"

struct aio_thread {
    aio_thread(int tid, const aio_config& config);  // creates the libaio context (may throw)

    void run();   // thread body: until stop(), pop work, op->run(_tid, ...), push to complete queue
    void stop();  // asks run() to return once its work queue is empty

    void push_work(std::shared_ptr<aio_op_desc> op);
    std::shared_ptr<aio_op_desc> pop_complete();  // blocks until this thread finished its next op

    const int _tid;
    const aio_config _config;
    aio_context _context;
    std::unique_ptr<aligned_buffer> _bounce;  // staging ring for misaligned tensors, made on first use
    std::deque<std::shared_ptr<aio_op_desc>> _work_queue;
    std::deque<std::shared_ptr<aio_op_desc>> _complete_queue;
    thread_sync _work_sync;
    thread_sync _complete_sync;
    bool _time_to_exit = false;  // guarded by _work_sync
};
