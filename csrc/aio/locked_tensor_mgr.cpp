// Page-locked tensor allocation for new_cpu_locked_tensor / free_cpu_locked_tensor.
#include "locked_tensor_mgr.h"

#include <ATen/ops/from_blob.h>

#include "aligned_buffer.h"

at::Tensor locked_tensor_mgr::alloc(int64_t num_elem, at::ScalarType dtype, bool* locked)
{
    const size_t num_bytes = static_cast<size_t>(num_elem) * c10::elementSize(dtype);
    aligned_buffer* memory = new aligned_buffer(num_bytes, /*lock=*/true);
    *locked = memory->_locked;
    at::Tensor tensor = at::from_blob(
        memory->_ptr, {num_elem}, [memory](void*) { delete memory; },
        at::TensorOptions().dtype(dtype).device(at::kCPU));
    std::lock_guard<std::mutex> lock(_mutex);
    _live.insert(memory->_ptr);
    return tensor;
}

bool locked_tensor_mgr::free(const at::Tensor& tensor)
{
    std::lock_guard<std::mutex> lock(_mutex);
    return _live.erase(tensor.data_ptr()) > 0;
}
