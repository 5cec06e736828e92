// locked_tensor_mgr: hands out page-aligned, page-locked CPU tensors and remembers which are its own.
#pragma once

#include <ATen/core/Tensor.h>

#include <mutex>
#include <set>
#include <string>

struct locked_tensor_mgr {
    // A 1-D tensor of num_elem elements of `dtype`, page-aligned and mlock'ed (best effort:
    // *locked says whether mlock succeeded, e.g. RLIMIT_MEMLOCK can refuse it). The memory is owned
    // by the tensor's storage, so it is freed when the last reference goes, never before.
    at::Tensor alloc(int64_t num_elem, at::ScalarType dtype, bool* locked);
    // Forgets a tensor alloc() made; returns false for any other tensor. The memory itself is
    // released with the tensor's last reference (so a stale Python reference cannot dangle).
    bool free(const at::Tensor& tensor);

    std::mutex _mutex;
    std::set<const void*> _live;  // data pointers handed out and not yet freed
};
