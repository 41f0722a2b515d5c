/* Status strings, version and the thread-local last-error message. */
#include <stdarg.h>
#include <stdio.h>

#include "fh_internal.h"

#define FH_STR_(x) #x
#define FH_STR(x) FH_STR_(x)

const char* fh_version(void) {
  return FH_STR(FH_VERSION_MAJOR) "." FH_STR(FH_VERSION_MINOR) "." FH_STR(FH_VERSION_PATCH);
}

int fh_version_number(void) { return FH_VERSION_NUMBER; }

const char* fh_status_string(fh_status_t status) {
  switch (status) {
#define FH_STATUS_CASE_(name, value, text) \
  case name: return text;
    FH_STATUS_MAP(FH_STATUS_CASE_)
#undef FH_STATUS_CASE_
    default: return "unknown status";
  }
}

/* One message buffer per thread, so concurrent callers never see each other's errors. */
static _Thread_local char fh_last_error_buf[512];

const char* fh_last_error(void) { return fh_last_error_buf; }

void fh_clear_error(void) { fh_last_error_buf[0] = '\0'; }

fh_status_t fh_set_error(fh_status_t status, const char* fn, const char* fmt, ...) {
  int n = snprintf(fh_last_error_buf, sizeof fh_last_error_buf, "%s: ", fn ? fn : "fusedhead");
  if (n < 0 || (size_t)n >= sizeof fh_last_error_buf) return status;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(fh_last_error_buf + n, sizeof fh_last_error_buf - (size_t)n, fmt, ap);
  va_end(ap);
  return status;
}
