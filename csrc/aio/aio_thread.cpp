// Worker thread loop: FIFO work queue in, FIFO complete queue out, so every thread's k-th completion
// is the same request.
#include "aio_thread.h"

aio_thread::aio_thread(int tid, const aio_config& config)
    : _tid(tid), _config(config), _context(config._queue_depth)
{
}

void aio_thread::run()
{
    while (true) {
        std::shared_ptr<aio_op_desc> op;
        {
            std::unique_lock<std::mutex> lock(_work_sync._mutex);
            _work_sync._cond_var.wait(lock, [this] { return _time_to_exit || !_work_queue.empty(); });
            if (_work_queue.empty()) { return; }  // _time_to_exit and nothing left
            op = std::move(_work_queue.front());
            _work_queue.pop_front();
        }
        op->run(_tid, _context, _config, _bounce);
        {
            std::lock_guard<std::mutex> lock(_complete_sync._mutex);
            _complete_queue.push_back(std::move(op));
        }
        _complete_sync._cond_var.notify_one();
    }
}

void aio_thread::stop()
{
    {
        std::lock_guard<std::mutex> lock(_work_sync._mutex);
        _time_to_exit = true;
    }
    _work_sync._cond_var.notify_one();
}

void aio_thread::push_work(std::shared_ptr<aio_op_desc> op)
{
    {
        std::lock_guard<std::mutex> lock(_work_sync._mutex);
        _work_queue.push_back(std::move(op));
    }
    _work_sync._cond_var.notify_one();
}

std::shared_ptr<aio_op_desc> aio_thread::pop_complete()
{
    std::unique_lock<std::mutex> lock(_complete_sync._mutex);
    _complete_sync._cond_var.wait(lock, [this] { return !_complete_queue.empty(); });
    std::shared_ptr<aio_op_desc> op = std::move(_complete_queue.front());
    _complete_queue.pop_front();
    return op;
}
