/* emu_test.h: helpers for the emulator's own Criterion suites (test_*.cu, compiled as host C++
 * with emu_device.h force-included). Device buffers come from the emulated cudaMalloc, so they
 * start as 0xFF bytes (NaN) exactly as the kernels will see them. */
#ifndef FH_EMU_TEST_H
#define FH_EMU_TEST_H

#include <criterion/criterion.h>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <initializer_list>
#include <string>
#include <vector>

#include "common.cuh"
#include "fh_emu.h"

/* Test buffers are freed when the test's process exits (before LeakSanitizer looks), so the
 * tests need no cleanup code and a leak report always means a leak in the library. */
struct DevAllocations {
  std::vector<void*> ptrs;
  ~DevAllocations() {
    for (void* p : ptrs) cudaFree(p);
  }
};
inline DevAllocations& dev_allocations() {
  static DevAllocations a;
  return a;
}
template <class T>
T* dev_alloc(size_t n) {
  void* p = nullptr;
  cr_assert_eq(cudaMalloc(&p, n * sizeof(T)), cudaSuccess);
  dev_allocations().ptrs.push_back(p);
  return static_cast<T*>(p);
}
template <class T>
T* dev_upload(const std::vector<T>& h) {
  T* d = dev_alloc<T>(h.size());
  cr_assert_eq(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}
template <class T>
std::vector<T> dev_download(const T* d, size_t n) {
  std::vector<T> h(n);
  cr_assert_eq(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}
/* Every launch in a test is followed by this: a launch error is a test failure. */
#define EMU_CHECK_LAUNCH() cr_assert_eq(cudaGetLastError(), cudaSuccess, "launch failed")

/* Runs `fn` in a forked child with stderr captured and asserts that it aborts (SIGABRT) with a
 * report containing every string of `needles`. Checking the text, not only
 * the signal, makes sure the emulator caught the mistake the test is about and not another one.
 * FH_EMU_SHOW_REPORTS=1 in the environment prints the captured reports. */
inline void expect_report(void (*fn)(), std::initializer_list<const char*> needles) {
  int fds[2];
  cr_assert_eq(pipe(fds), 0);
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) {
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    fn();
    _exit(0);
  }
  close(fds[1]);
  static std::string out; /* static: a failed assertion leaves without running destructors */
  out.clear();
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, (size_t)n);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (getenv("FH_EMU_SHOW_REPORTS")) fputs(out.c_str(), stderr); /* to read the reports themselves */
  cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "expected an abort with a report; status 0x%x, stderr:\n%s",
            status, out.c_str());
  for (const char* n : needles)
    cr_assert(out.find(n) != std::string::npos, "report lacks \"%s\":\n%s", n, out.c_str());
}

#endif
