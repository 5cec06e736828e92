// Page-aligned (and optionally page-locked) host allocations for O_DIRECT transfers.
#include "aligned_buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

aligned_buffer::aligned_buffer(size_t num_bytes, bool lock)
{
    _num_bytes = num_bytes == 0 ? k_alignment : (num_bytes + k_alignment - 1) / k_alignment * k_alignment;
    if (::posix_memalign(&_ptr, k_alignment, _num_bytes) != 0) {
        _ptr = nullptr;
        throw std::bad_alloc();
    }
    if (lock) { _locked = ::mlock(_ptr, _num_bytes) == 0; }
}

aligned_buffer::~aligned_buffer()
{
    if (_locked) { ::munlock(_ptr, _num_bytes); }
    std::free(_ptr);
}
