// thread_sync: the mutex and condition variable guarding one of a worker's queues.
#pragma once

#include <condition_variable>
#include <mutex>

struct thread_sync {
    std::mutex _mutex;
    std::condition_variable _cond_var;
};
