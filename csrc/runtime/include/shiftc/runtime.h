// shiftc C++ runtime: run a model library compiled by `shiftc compile` (one .so with the weights
// inside) from C++, on top of the TVM runtime (libtvm_runtime + libtvm_ffi).
//
//   shiftc::Model model = shiftc::Model::Load("model.so");
//   model.SetInput("pixel_values", pixels.data(), {1, 3, 224, 224});   // float32, copied
//   model.Run();
//   std::vector<float> logits = model.OutputFloats("logits");
//
//   shiftc::LMSession lm(model);                        // causal LMs: KV-cache decoding, batch 1
//   std::vector<float> next = lm.Step({1, 2, 3});       // last-token logits [vocab]
//
// This header has no TVM types in it: link shiftc::runtime and include this file. All errors
// (missing library, not a shiftc library, unknown input name, wrong dtype/rank/dimension, TVM
// failures) are thrown as shiftc::Error with a message naming the problem.
//
// Threading: a Model and the LMSessions made from it share one Relax VM; use them from one
// thread at a time (TVM parallelizes each run itself, see SetNumThreads).
// Inputs are copied into TVM tensors by SetInput, so the caller's buffers can be reused at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// libshiftc_runtime is built with hidden visibility; this marks its public API (Linux/macOS).
#define SHIFTC_API __attribute__((visibility("default")))

namespace shiftc {

class SHIFTC_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Where a model runs. Only the CPU is supported in this version; the argument is kept so GPU
// targets can be added without changing the API. Values follow DLPack's DLDeviceType.
struct Device {
  int type = 1;  // kDLCPU
  int id = 0;
  static Device CPU(int id = 0) { return Device{1, id}; }
};

// One input or output of the model signature (from the library's embedded metadata).
struct TensorInfo {
  std::string name;
  std::string dtype;                 // "float32", "int64", ...
  std::vector<int64_t> shape;        // -1 for a symbolic dimension
  std::vector<std::string> symbols;  // per axis: "" if fixed, else the symbol ("batch", "past + seq")
};

// A read-only view of an output tensor. `data` stays valid until the next Run() (or until the
// Model is destroyed); copy what you need to keep.
struct SHIFTC_API TensorView {
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
  int64_t NumElements() const;
  template <typename T>
  const T* As() const { return static_cast<const T*>(data); }
};

class SHIFTC_API Model {
 public:
  // Opens a model library. Throws shiftc::Error if the file is missing, cannot be loaded, or is
  // not a shiftc model library (no `shiftc_metadata`).
  static Model Load(const std::string& path, Device device = Device::CPU());

  // Size of the TVM runtime's thread pool (process-wide, n >= 1). Without a call, TVM picks it
  // (the TVM_NUM_THREADS environment variable overrides its choice).
  static void SetNumThreads(int n);

  Model(Model&&) noexcept = default;
  Model& operator=(Model&&) noexcept = default;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const std::string& path() const;
  const std::string& task() const;  // "causal-lm" | "encoder" | "image-classification" | "custom"
  const std::vector<TensorInfo>& inputs() const;
  const std::vector<TensorInfo>& outputs() const;
  const std::string& metadata_json() const;  // the full embedded metadata

  // Copy a user buffer (row-major, `dtype` elements of `shape`) into input `name`. Checks the
  // name, dtype, rank and fixed dimensions now; symbolic dimensions are checked by Run().
  void SetInput(const std::string& name, const void* data, const std::vector<int64_t>& shape,
                const std::string& dtype);
  void SetInput(const std::string& name, const float* data, const std::vector<int64_t>& shape) {
    SetInput(name, data, shape, "float32");
  }
  void SetInput(const std::string& name, const int64_t* data, const std::vector<int64_t>& shape) {
    SetInput(name, data, shape, "int64");
  }

  // Runs `main` on the inputs set so far (all of them must be set; they persist between runs).
  void Run();

  size_t num_outputs() const;
  TensorView Output(size_t index) const;
  TensorView Output(const std::string& name) const;
  std::vector<float> OutputFloats(const std::string& name) const;  // float32 outputs only

 private:
  friend class LMSession;
  struct Impl;
  explicit Model(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

// Incremental decoding of one sequence with a causal LM (task "causal-lm"). The KV cache stays in
// TVM tensors between steps. The session keeps the model library alive.
class SHIFTC_API LMSession {
 public:
  explicit LMSession(const Model& model);
  ~LMSession();
  LMSession(LMSession&&) noexcept;
  LMSession& operator=(LMSession&&) noexcept;

  // Feeds `token_ids` (one or more new tokens) and returns the logits of the last one [vocab].
  std::vector<float> Step(const std::vector<int64_t>& token_ids);
  void Reset();            // empty the KV cache
  int64_t Length() const;  // tokens in the KV cache
  int64_t vocab_size() const;
  const std::vector<int64_t>& eos_token_ids() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shiftc
