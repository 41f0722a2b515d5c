/* emu_fiber.h: the context switch under the emulator's fibers.
 *
 * x86-64: a dozen instructions of our own (callee-saved registers, MXCSR and the x87 control
 * word, then the stack pointer), because glibc's swapcontext makes a sigprocmask system call per
 * switch and, worse, AddressSanitizer's swapcontext interceptor clears the shadow of the whole
 * target stack on every switch: with 256 KiB stacks that made the kernel suites 2-5x slower.
 * Elsewhere (or with -DFH_EMU_UCONTEXT) makecontext/swapcontext. Either way the caller announces
 * each switch to ASan (emu_core.cpp). */
#ifndef FH_EMU_FIBER_H
#define FH_EMU_FIBER_H

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) && !defined(FH_EMU_UCONTEXT)
#define FH_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace fh_emu {

#ifdef FH_EMU_ASM_SWITCH
extern "C" void fh_emu_switch(void** save_sp, void* new_sp);
extern "C" void fh_emu_fiber_start();
struct FiberContext {
  void* sp;
};
/* A fresh stack looks like one suspended in fh_emu_switch whose return address is
 * fh_emu_fiber_start (which calls `entry`, fixed at link time: fh_emu_fiber_entry). */
inline void fiber_prepare(FiberContext& c, char* stack, size_t size) {
  uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
  uint64_t* p = reinterpret_cast<uint64_t*>(top);
  *--p = (uint64_t)(uintptr_t)&fh_emu_fiber_start; /* at top-8: after `ret`, rsp is 16-aligned */
  for (int i = 0; i < 6; ++i) *--p = 0;             /* rbp rbx r12 r13 r14 r15 */
  *--p = 0x1f80ull | (0x037full << 32);             /* default MXCSR, x87 control word */
  c.sp = p;
}
inline void fiber_switch(FiberContext& from, FiberContext& to) { fh_emu_switch(&from.sp, to.sp); }
#else
extern "C" void fh_emu_fiber_entry();
struct FiberContext {
  ucontext_t uc;
};
inline void fiber_prepare(FiberContext& c, char* stack, size_t size) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fh_emu_fiber_entry, 0);
}
inline void fiber_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

} // namespace fh_emu

#endif
