/* CPU feature detection for the native kernels (AVX2 paths, portable fallback). */
#include "lb_common.h"

int lb_has_avx2(void) {
#if LB_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
#else
    return 0;
#endif
}

/* Lets Python check that it loaded the library it expects. */
int lb_abi_version(void) { return 1; }

/* 1 when the vector (AVX2) paths run on this CPU. */
int lb_vector_isa(void) { return lb_has_avx2(); }
