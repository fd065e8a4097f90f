// The public header compiles as C++ and declares its functions with C linkage.
#include <vfiokit.h>

extern "C" uint32_t (*const abi_version)(void) = vfiokit_abi_version;
static_assert(sizeof(vfiokit_region) == 64, "record size is the same in C++");
