# Cross-compiling shiftc's C++ runtime and shiftc_run for 64-bit Arm Linux (aarch64) on an x86-64
# Debian/Ubuntu host (apt-get install g++-aarch64-linux-gnu; qemu-user to run the results here):
#
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-toolchain.cmake \
#         -DSHIFTC_BUILD_RUNTIME=ON -DSHIFTC_BUILD_PYTHON=OFF \
#         -DTVM_WHEEL_DIR=<aarch64 wheel>/tvm -DTVM_FFI_WHEEL_DIR=<aarch64 wheel>/tvm_ffi
#
# The TVM runtime libraries must be the aarch64 ones (the aarch64 apache-tvm / apache-tvm-ffi wheels,
# unpacked); `shiftc package` does all of this. SHIFTC_CROSS_TRIPLE picks another GNU toolchain
# prefix, SHIFTC_CROSS_SYSROOT the target's root (libc, libstdc++) used for find_* and by qemu.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(SHIFTC_CROSS_TRIPLE "aarch64-linux-gnu" CACHE STRING "GNU triple prefix of the cross toolchain")
set(SHIFTC_CROSS_SYSROOT "/usr/${SHIFTC_CROSS_TRIPLE}" CACHE PATH "target root (Debian's cross packages install here)")

find_program(_shiftc_cross_cxx "${SHIFTC_CROSS_TRIPLE}-g++")
find_program(_shiftc_cross_cc "${SHIFTC_CROSS_TRIPLE}-gcc")
if(NOT _shiftc_cross_cxx)
  message(FATAL_ERROR "${SHIFTC_CROSS_TRIPLE}-g++ not found (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)")
endif()
set(CMAKE_CXX_COMPILER "${_shiftc_cross_cxx}")
if(_shiftc_cross_cc)
  set(CMAKE_C_COMPILER "${_shiftc_cross_cc}")
endif()

# Libraries and headers from the target root only; programs (python, qemu) from the host.
set(CMAKE_FIND_ROOT_PATH "${SHIFTC_CROSS_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Packages (find_package(shiftc) in a package folder) from CMAKE_PREFIX_PATH as given, too.
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# ctest (and add_custom_command's use of built programs) runs them under qemu when it is installed.
find_program(_shiftc_qemu qemu-aarch64)
if(_shiftc_qemu)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${_shiftc_qemu};-L;${SHIFTC_CROSS_SYSROOT}")
endif()
