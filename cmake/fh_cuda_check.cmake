# fh_cuda_check.cmake: the compile-only CUDA check (CI step 2, docs/architecture.md).
# When nvcc is available, `cmake --build <dir> --target ptxas_stats` and the ctest `ptxas`
# compile every kernels/*.cu for sm_80 and sm_90 through scripts/ptxas_stats.sh, which writes
# <build>/ptxas_stats.md (registers, stack, spills, shared memory per kernel) and fails on any
# spill or compile error. No GPU is needed.
if(CMAKE_CUDA_COMPILER)
  set(FH_NVCC ${CMAKE_CUDA_COMPILER})
else()
  find_program(FH_NVCC nvcc HINTS ${CUDAToolkit_BIN_DIR} /usr/local/cuda/bin)
endif()
option(FH_PTXAS_TEST "Add the ctest 'ptxas' (nvcc compile check and ptxas statistics)" ON)
if(FH_NVCC)
  set(FH_PTXAS_CMD ${CMAKE_COMMAND} -E env NVCC=${FH_NVCC}
      bash ${PROJECT_SOURCE_DIR}/scripts/ptxas_stats.sh ${PROJECT_BINARY_DIR}/ptxas_stats.md)
  add_custom_target(ptxas_stats COMMAND ${FH_PTXAS_CMD} WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
                    COMMENT "nvcc -Xptxas -v for sm_80 and sm_90 -> ptxas_stats.md" VERBATIM)
  if(FH_PTXAS_TEST)
    add_test(NAME ptxas COMMAND ${FH_PTXAS_CMD})
    set_tests_properties(ptxas PROPERTIES LABELS cuda_compile TIMEOUT 1800)
  endif()
else()
  message(STATUS "fusedhead: nvcc not found, no ptxas statistics / compile-only CUDA check")
endif()
