// Page-aligned (and optionally page-locked) host allocations for O_DIRECT transfers.
#include "aligned_buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace {
constexpr size_t k_huge_page = 2 << 20;
}  // namespace

aligned_buffer::aligned_buffer(size_t num_bytes, bool lock)
{
    _num_bytes = num_bytes == 0 ? k_alignment : (num_bytes + k_alignment - 1) / k_alignment * k_alignment;
    // Large buffers are 2 MiB aligned and asked for transparent huge pages: the kernel pins (and
    // the CPU translates) one huge page instead of 512 small ones for every O_DIRECT request.
    const bool huge = _num_bytes >= k_huge_page;
    if (::posix_memalign(&_ptr, huge ? k_huge_page : k_alignment, _num_bytes) != 0) {
        _ptr = nullptr;
        throw std::bad_alloc();
    }
#ifdef MADV_HUGEPAGE
    if (huge) { ::madvise(_ptr, _num_bytes / k_huge_page * k_huge_page, MADV_HUGEPAGE); }  // a hint only
#endif
    if (lock) { _locked = ::mlock(_ptr, _num_bytes) == 0; }
}

aligned_buffer::~aligned_buffer()
{
    if (_locked) { ::munlock(_ptr, _num_bytes); }
    std::free(_ptr);
}
