// shiftc C++ runtime (see include/shiftc/runtime.h). Only tvm-ffi headers are used: the TVM
// runtime proper (VM, allocators, tensor copies) is reached through its registered global
// functions, the same ones the Python package calls, so the two runtimes run identical code.
#include "shiftc/runtime.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <thread>
#include <utility>

namespace ffi = tvm::ffi;

namespace shiftc {
namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
constexpr int64_t kLibraryFormat = 1;  // shiftc/backend/compile.py LIBRARY_FORMAT

// Runs `fn`, turning TVM's exceptions into shiftc::Error prefixed with `context`.
template <typename F>
auto Guard(const std::string& context, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const ffi::Error& e) {
    std::string msg = e.message();
    throw Error(context + ": " + msg.substr(0, msg.find('\n')));
  }
}

ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) throw Error(std::string("TVM runtime function '") + name + "' is not registered (libtvm_runtime not loaded?)");
  return *f;
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

ffi::Tensor Alloc(const std::vector<int64_t>& shape, DLDataType dtype, DLDevice dev) {
  static const ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
  return alloc(ffi::Shape(shape.begin(), shape.end()), dtype, dev, ffi::Optional<ffi::String>())
      .cast<ffi::Tensor>();
}

ffi::Tensor FromHost(const void* data, const std::vector<int64_t>& shape, DLDataType dtype, DLDevice dev) {
  static const ffi::Function copy = Global("runtime.TVMTensorCopyFromBytes");
  ffi::Tensor t = Alloc(shape, dtype, dev);
  size_t nbytes = ffi::GetDataSize(t);
  if (nbytes) copy(t, const_cast<void*>(data), static_cast<int64_t>(nbytes));
  return t;
}

// -- metadata -----------------------------------------------------------------------------------

std::string Str(const ffi::Any& v) {
  if (auto s = v.as<ffi::String>()) return std::string(*s);
  throw Error("malformed shiftc metadata: expected a string");
}

ffi::Any Field(const ffi::Map<ffi::Any, ffi::Any>& obj, const char* key) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) throw Error(std::string("malformed shiftc metadata: no '") + key + "'");
  return (*it).second;
}

std::vector<TensorInfo> ParseSignature(const ffi::Any& list) {
  std::vector<TensorInfo> out;
  for (const ffi::Any& item : list.cast<ffi::Array<ffi::Any>>()) {
    auto obj = item.cast<ffi::Map<ffi::Any, ffi::Any>>();
    TensorInfo info{Str(Field(obj, "name")), Str(Field(obj, "dtype")), {}, {}};
    for (const ffi::Any& d : Field(obj, "shape").cast<ffi::Array<ffi::Any>>()) {
      if (auto n = d.as<int64_t>()) {
        info.shape.push_back(*n);
        info.symbols.emplace_back();
      } else {
        info.shape.push_back(-1);
        info.symbols.push_back(Str(d));
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

// Value of a dimension expression over + - * of symbols and integers ("past + seq"), or nullopt
// when it uses a symbol no input fixed.
std::optional<int64_t> EvalDim(const std::string& expr, const std::map<std::string, int64_t>& env) {
  int64_t sum = 0, term = 1, sign = 1;
  size_t i = 0;
  while (i <= expr.size()) {
    while (i < expr.size() && expr[i] == ' ') ++i;
    size_t j = i;
    while (j < expr.size() && (std::isalnum(static_cast<unsigned char>(expr[j])) || expr[j] == '_')) ++j;
    std::string tok = expr.substr(i, j - i);
    if (tok.empty()) return std::nullopt;
    int64_t value;
    if (std::isdigit(static_cast<unsigned char>(tok[0]))) {
      value = std::stoll(tok);
    } else {
      auto it = env.find(tok);
      if (it == env.end()) return std::nullopt;
      value = it->second;
    }
    term *= value;
    while (j < expr.size() && expr[j] == ' ') ++j;
    if (j == expr.size()) return sum + sign * term;
    char op = expr[j];
    if (op == '*') {
    } else if (op == '+' || op == '-') {
      sum += sign * term;
      term = 1;
      sign = op == '+' ? 1 : -1;
    } else {
      return std::nullopt;
    }
    i = j + 1;
  }
  return std::nullopt;
}

}  // namespace

// -- Model --------------------------------------------------------------------------------------

struct Model::Impl {
  std::string path, task, meta_json;
  DLDevice device{};
  ffi::Module vm{ffi::UnsafeInit()};
  ffi::Function main;
  // decode: main specialised to one sequence and one new token (libraries with in-place caches
  // from this shiftc on; absent in older ones), called for such steps
  ffi::Optional<ffi::Function> decode;
  std::vector<TensorInfo> inputs, outputs;
  std::vector<ffi::Optional<ffi::Tensor>> feeds;  // per input, set by SetInput
  std::vector<ffi::Tensor> results;               // outputs of the last Run
  ffi::Map<ffi::Any, ffi::Any> meta;
  // main takes in-place caches [B, KVH, max_len, D] after the first three inputs and returns the
  // logits only (shiftc/backend/kv_cache.py); the metadata's signature stays the ONNX graph's
  bool kv_inplace = false;
  DLDataType kv_dtype{kDLFloat, 32, 1};  // element type of the in-place caches (metadata "dtype")

  size_t InputIndex(const std::string& name) const {
    for (size_t i = 0; i < inputs.size(); ++i)
      if (inputs[i].name == name) return i;
    std::string names;
    for (const auto& in : inputs) names += (names.empty() ? "" : ", ") + in.name;
    throw Error(path + ": unknown input '" + name + "'; the model takes [" + names + "]");
  }

  // one_token: a step of one sequence and one token, which `decode` runs where the library has it
  std::vector<ffi::Tensor> Call(const std::vector<ffi::Tensor>& args, bool one_token = false) const {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    std::vector<ffi::Tensor> outs;
    const ffi::Function& fn = one_token && decode ? *decode : main;
    Guard(path + ": running main", [&] {
      ffi::Any ret;
      fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &ret);
      if (auto single = ret.as<ffi::Tensor>()) return outs.push_back(*single);
      for (const ffi::Any& v : ret.cast<ffi::Array<ffi::Any>>()) outs.push_back(v.cast<ffi::Tensor>());
    });
    size_t want = kv_inplace ? 1 : outputs.size();
    if (outs.size() != want)
      throw Error(path + ": main returned " + std::to_string(outs.size()) + " outputs, expected " +
                  std::to_string(want));
    return outs;
  }
};

namespace {

char* Bytes(const ffi::Tensor& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

bool IsHalf(DLDataType t) { return t.code == kDLFloat && t.bits == 16 && t.lanes == 1; }

// float32 <-> float16 bit patterns (round to nearest even) for the graph-signature adapter of a
// library whose in-place caches are float16 (the graph's past and present are float32).
uint16_t HalfFromFloat(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (ax < 0x38800000u) {  // a subnormal half: rounded by one float addition at its spacing
    float a;
    std::memcpy(&a, &ax, sizeof a);
    a += 0.5f;
    uint32_t r;
    std::memcpy(&r, &a, sizeof r);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  return static_cast<uint16_t>(sign | ((ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13));
}

float FloatFromHalf(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = em << 13;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  f *= 0x1p112f;  // rebias the exponent; subnormals come out normalised
  std::memcpy(&bits, &f, sizeof bits);
  if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A zeroed cache [B, H, rows, D] of `dtype` holding the first `keep` rows of `from` ([B, H, >= keep,
// D], the same dtype or float32 going into a float16 cache).
ffi::Tensor CacheWithRows(const ffi::Tensor& from, int64_t rows, int64_t keep, DLDataType dtype, DLDevice dev) {
  const int64_t b = from.size(0), h = from.size(1), have = from.size(2), d = from.size(3);
  ffi::Tensor c = Alloc({b, h, rows, d}, dtype, dev);
  const size_t esz = dtype.bits / 8;
  char* dst = Bytes(c);
  const char* src = Bytes(from);
  std::memset(dst, 0, static_cast<size_t>(b * h * rows * d) * esz);
  const bool narrow = IsHalf(dtype) && !IsHalf(from.dtype());
  for (int64_t i = 0; i < b * h; ++i) {
    if (!narrow) {
      std::memcpy(dst + i * rows * d * esz, src + i * have * d * esz, static_cast<size_t>(keep * d) * esz);
      continue;
    }
    auto* out = reinterpret_cast<uint16_t*>(dst) + i * rows * d;
    const auto* in = reinterpret_cast<const float*>(src) + i * have * d;
    for (int64_t j = 0; j < keep * d; ++j) out[j] = HalfFromFloat(in[j]);
  }
  return c;
}

// The float32 copy of a float16 cache.
ffi::Tensor WidenCache(const ffi::Tensor& c, DLDevice dev) {
  ffi::Tensor w = Alloc({c.size(0), c.size(1), c.size(2), c.size(3)}, DLDataType{kDLFloat, 32, 1}, dev);
  auto* out = reinterpret_cast<float*>(Bytes(w));
  const auto* in = reinterpret_cast<const uint16_t*>(Bytes(c));
  const int64_t n = c.size(0) * c.size(1) * c.size(2) * c.size(3);
  for (int64_t j = 0; j < n; ++j) out[j] = FloatFromHalf(in[j]);
  return w;
}

}  // namespace

Model::Model(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Model Model::Load(const std::string& path, Device device) {
  // TVM sizes its thread pool from TVM_NUM_THREADS, else from half the logical CPUs, and pins the
  // process to the cores it chose (one core on a 2-core board); SetNumThreads sizes the pool, so
  // let TVM see every core before it starts one.
  if (std::getenv("TVM_NUM_THREADS") == nullptr) {
    unsigned n = std::thread::hardware_concurrency();
    setenv("TVM_NUM_THREADS", std::to_string(n ? n : 1).c_str(), 0);
  }
  if (device.type != kDLCPU) throw Error("only Device::CPU() is supported by this shiftc runtime");
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw Error("model library '" + path + "' does not exist");
  const std::string ext = std::filesystem::path(path).extension().string();
  if (ext != ".so" && ext != ".dylib")
    throw Error("'" + path + "' is not a model library (expected a .so compiled by `shiftc compile`)");
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->device = DLDevice{static_cast<DLDeviceType>(device.type), device.id};
  // An absolute path, or dlopen() would search the library path for a bare file name.
  std::string abs = std::filesystem::absolute(path).string();
  ffi::Module lib = Guard("'" + path + "' is not a loadable model library", [&] {
    try {
      return ffi::Module::LoadFromFile(abs);
    } catch (const ffi::Error& e) {
      if (e.message().find("cuda") == std::string::npos) throw;
      throw Error("'" + path + "' is compiled for CUDA; this C++ runtime runs CPU model libraries only");
    }
  });
  auto load_exec = lib->GetFunction("vm_load_executable", true);
  if (!load_exec) throw Error("'" + path + "' is not a shiftc model library (no Relax VM executable)");
  Guard(path + ": initializing the Relax VM", [&] {
    impl->vm = (*load_exec)().cast<ffi::Module>();
    impl->vm->GetFunction("vm_initialization", false).value()(
        static_cast<int>(device.type), device.id, kPooledAllocator);
  });
  auto meta_fn = impl->vm->GetFunction("shiftc_metadata", false);
  ffi::Optional<ffi::Tensor> blob;
  if (meta_fn) blob = Guard(path + ": reading metadata", [&] { return (*meta_fn)().cast<ffi::Tensor>(); });
  if (!blob || blob.value().ndim() != 1 || blob.value().dtype().bits != 8)
    throw Error("'" + path + "' is not a shiftc model library (no shiftc_metadata)");
  const char* bytes = static_cast<const char*>(blob.value().data_ptr()) + blob.value().byte_offset();
  impl->meta_json.assign(bytes, static_cast<size_t>(blob.value().numel()));
  Guard(path + ": malformed shiftc metadata", [&] {
    impl->meta = ffi::json::Parse(impl->meta_json).cast<ffi::Map<ffi::Any, ffi::Any>>();
    int64_t format = Field(impl->meta, "format").cast<int64_t>();
    if (format != kLibraryFormat)
      throw Error(path + ": library format " + std::to_string(format) + ", this runtime reads format " +
                  std::to_string(kLibraryFormat) + " (rebuild it with a matching shiftc)");
    auto dev = impl->meta.find(ffi::String("device"));
    if (dev != impl->meta.end() && Str((*dev).second) != "cpu")
      throw Error("'" + path + "' is compiled for " + Str((*dev).second) + "; this C++ runtime runs CPU model libraries only");
    auto task = impl->meta.find(ffi::String("task"));
    impl->task = task == impl->meta.end() ? "custom" : Str((*task).second);
    impl->inputs = ParseSignature(Field(impl->meta, "inputs"));
    impl->outputs = ParseSignature(Field(impl->meta, "outputs"));
    auto kv = impl->meta.find(ffi::String("kv_cache"));
    if (kv != impl->meta.end())
      if (auto kvm = (*kv).second.as<ffi::Map<ffi::Any, ffi::Any>>())
      {
        impl->kv_inplace = Str(Field(*kvm, "mode")) == "inplace";
        auto dt = kvm->find(ffi::String("dtype"));  // absent in libraries from before float16 caches
        if (dt != kvm->end() && Str((*dt).second) == "float16") impl->kv_dtype = DLDataType{kDLFloat, 16, 1};
      }
  });
  impl->feeds.resize(impl->inputs.size());
  auto main = impl->vm->GetFunction("main", false);
  if (!main) throw Error("'" + path + "' has no 'main' function");
  impl->main = *main;
  if (impl->kv_inplace) impl->decode = impl->vm->GetFunction("decode", false);
  return Model(std::move(impl));
}

void Model::SetNumThreads(int n) {
  if (n < 1) throw Error("SetNumThreads: the thread count must be >= 1, got " + std::to_string(n));
  Guard("config_threadpool", [&] { Global("runtime.config_threadpool")(0, n); });
}

const std::string& Model::path() const { return impl_->path; }
const std::string& Model::task() const { return impl_->task; }
const std::vector<TensorInfo>& Model::inputs() const { return impl_->inputs; }
const std::vector<TensorInfo>& Model::outputs() const { return impl_->outputs; }
const std::string& Model::metadata_json() const { return impl_->meta_json; }

void Model::SetInput(const std::string& name, const void* data, const std::vector<int64_t>& shape,
                     const std::string& dtype) {
  size_t idx = impl_->InputIndex(name);
  const TensorInfo& info = impl_->inputs[idx];
  const std::string where = impl_->path + ": input '" + name + "'";
  if (dtype != info.dtype) throw Error(where + " must be " + info.dtype + ", got " + dtype);
  if (shape.size() != info.shape.size())
    throw Error(where + " must have rank " + std::to_string(info.shape.size()) + ", got shape " + ShapeStr(shape));
  for (size_t a = 0; a < shape.size(); ++a) {
    if (shape[a] < 0) throw Error(where + ": negative dimension in shape " + ShapeStr(shape));
    if (info.shape[a] >= 0 && shape[a] != info.shape[a])
      throw Error(where + " dimension " + std::to_string(a) + " must be " + std::to_string(info.shape[a]) +
                  ", got " + std::to_string(shape[a]) + " (shape " + ShapeStr(shape) + ")");
  }
  DLDataType dt = Guard(where, [&] { return ffi::StringToDLDataType(dtype); });
  impl_->feeds[idx] = Guard(where, [&] { return FromHost(data, shape, dt, impl_->device); });
}

void Model::Run() {
  Impl& m = *impl_;
  // Symbolic dimensions: one value per symbol across inputs, and expressions must agree.
  std::map<std::string, int64_t> env;
  std::vector<ffi::Tensor> args;
  for (size_t i = 0; i < m.inputs.size(); ++i) {
    if (!m.feeds[i]) throw Error(m.path + ": input '" + m.inputs[i].name + "' was not set");
    ffi::Tensor t = m.feeds[i].value();
    for (size_t a = 0; a < m.inputs[i].symbols.size(); ++a) {
      const std::string& sym = m.inputs[i].symbols[a];
      bool plain = !sym.empty() && sym.find_first_of(" +-*") == std::string::npos;
      if (plain && !env.emplace(sym, t.size(a)).second && env[sym] != t.size(a))
        throw Error(m.path + ": input '" + m.inputs[i].name + "' dimension " + std::to_string(a) + " ('" + sym +
                    "') is " + std::to_string(t.size(a)) + ", but another input fixed '" + sym +
                    "' = " + std::to_string(env[sym]));
    }
    args.push_back(t);
  }
  for (size_t i = 0; i < m.inputs.size(); ++i)
    for (size_t a = 0; a < m.inputs[i].symbols.size(); ++a) {
      auto v = EvalDim(m.inputs[i].symbols[a], env);
      if (v && *v != args[i].size(a))
        throw Error(m.path + ": input '" + m.inputs[i].name + "' dimension " + std::to_string(a) + " must be " +
                    m.inputs[i].symbols[a] + " = " + std::to_string(*v) + ", got " + std::to_string(args[i].size(a)));
    }
  m.results.clear();
  if (!m.kv_inplace) {
    m.results = m.Call(args);
    return;
  }
  // The graph's signature on in-place caches: each past [B, H, P, D] goes into a cache of P + S
  // rows, which after the step holds the present (float32 again if the cache is float16).
  const int64_t seq = args[0].size(1);
  std::vector<ffi::Tensor> caches;
  for (size_t i = 3; i < args.size(); ++i) {
    caches.push_back(CacheWithRows(args[i], args[i].size(2) + seq, args[i].size(2), m.kv_dtype, m.device));
    args[i] = caches.back();
  }
  m.results = m.Call(args);
  for (const ffi::Tensor& c : caches) m.results.push_back(IsHalf(m.kv_dtype) ? WidenCache(c, m.device) : c);
}

size_t Model::num_outputs() const { return impl_->outputs.size(); }

int64_t TensorView::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

TensorView Model::Output(size_t index) const {
  if (impl_->results.empty()) throw Error(impl_->path + ": no outputs yet; call Run() first");
  if (index >= impl_->results.size())
    throw Error(impl_->path + ": output index " + std::to_string(index) + " out of range (" +
                std::to_string(impl_->results.size()) + " outputs)");
  const ffi::Tensor& t = impl_->results[index];
  if (t.device().device_type != kDLCPU || !t.IsContiguous())
    throw Error(impl_->path + ": output " + std::to_string(index) + " is not a contiguous CPU tensor");
  TensorView v;
  v.dtype = std::string(ffi::DLDataTypeToString(t.dtype()));
  v.shape.assign(t.shape().begin(), t.shape().end());
  v.data = static_cast<const char*>(t.data_ptr()) + t.byte_offset();
  v.nbytes = ffi::GetDataSize(t);
  return v;
}

TensorView Model::Output(const std::string& name) const {
  for (size_t i = 0; i < impl_->outputs.size(); ++i)
    if (impl_->outputs[i].name == name) return Output(i);
  throw Error(impl_->path + ": unknown output '" + name + "'");
}

std::vector<float> Model::OutputFloats(const std::string& name) const {
  TensorView v = Output(name);
  if (v.dtype != "float32") throw Error(impl_->path + ": output '" + name + "' is " + v.dtype + ", not float32");
  return std::vector<float>(v.As<float>(), v.As<float>() + v.NumElements());
}

// -- LMSession ----------------------------------------------------------------------------------

struct LMSession::Impl {
  std::shared_ptr<Model::Impl> model;
  int64_t layers = 0, kv_heads = 0, head_dim = 0, vocab = 0, length = 0;
  int64_t max_positions = 0;  // 0: no limit recorded
  std::vector<int64_t> eos;
  std::vector<ffi::Tensor> past;  // key/value per layer: [1, kv_heads, length or capacity, head_dim]
  int64_t capacity = 0;           // in-place caches: rows allocated (grown by doubling)
};

LMSession::LMSession(const Model& model) : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.model = model.impl_;
  const Model::Impl& m = *s.model;
  auto dec = m.meta.find(ffi::String("decoder"));
  if (m.task != "causal-lm" || dec == m.meta.end())
    throw Error(m.path + ": task is '" + m.task + "', not a causal LM with a KV cache");
  Guard(m.path + ": malformed decoder metadata", [&] {
    auto d = (*dec).second.cast<ffi::Map<ffi::Any, ffi::Any>>();
    s.layers = Field(d, "num_layers").cast<int64_t>();
    s.kv_heads = Field(d, "num_kv_heads").cast<int64_t>();
    s.head_dim = Field(d, "head_dim").cast<int64_t>();
    s.vocab = Field(d, "vocab_size").cast<int64_t>();
    auto maxp = d.find(ffi::String("max_positions"));
    if (maxp != d.end()) s.max_positions = (*maxp).second.cast<int64_t>();
    auto eos = d.find(ffi::String("eos_token_ids"));
    if (eos != d.end())
      for (const ffi::Any& e : (*eos).second.cast<ffi::Array<ffi::Any>>()) s.eos.push_back(e.cast<int64_t>());
  });
  size_t n = static_cast<size_t>(2 * s.layers);
  if (m.inputs.size() != 3 + n || m.outputs.size() != 1 + n || m.outputs[0].dtype != "float32")
    throw Error(m.path + ": signature does not match a KV-cache decoder with " + std::to_string(s.layers) + " layers");
  Reset();
}

LMSession::~LMSession() = default;
LMSession::LMSession(LMSession&&) noexcept = default;
LMSession& LMSession::operator=(LMSession&&) noexcept = default;

void LMSession::Reset() {
  Impl& s = *impl_;
  const DLDataType dtype = s.model->kv_inplace ? s.model->kv_dtype : DLDataType{kDLFloat, 32, 1};
  s.past.assign(static_cast<size_t>(2 * s.layers), Alloc({1, s.kv_heads, 0, s.head_dim}, dtype, s.model->device));
  s.length = 0;
  s.capacity = 0;
}

std::vector<float> LMSession::Step(const std::vector<int64_t>& token_ids) {
  Impl& s = *impl_;
  const Model::Impl& m = *s.model;
  if (token_ids.empty()) throw Error(m.path + ": LMSession::Step needs at least one token");
  for (int64_t t : token_ids)
    if (t < 0 || t >= s.vocab)
      throw Error(m.path + ": token id " + std::to_string(t) + " out of range [0, " + std::to_string(s.vocab) + ")");
  const int64_t seq = static_cast<int64_t>(token_ids.size()), total = s.length + seq;
  if (s.max_positions > 0 && total > s.max_positions)
    throw Error(m.path + ": " + std::to_string(total) + " tokens exceed the model's " + std::to_string(s.max_positions) +
                " positions (shiftc export --max-positions)");
  std::vector<int64_t> mask(static_cast<size_t>(total), 1), pos(token_ids.size());
  for (int64_t i = 0; i < seq; ++i) pos[static_cast<size_t>(i)] = s.length + i;
  const DLDataType i64{kDLInt, 64, 1};
  std::vector<ffi::Tensor> args = {FromHost(token_ids.data(), {1, seq}, i64, m.device),
                                   FromHost(mask.data(), {1, total}, i64, m.device),
                                   FromHost(pos.data(), {1, seq}, i64, m.device)};
  if (m.kv_inplace && total > s.capacity) {
    int64_t rows = std::max<int64_t>(256, s.capacity);
    while (rows < total) rows *= 2;
    for (ffi::Tensor& c : s.past) c = CacheWithRows(c, rows, s.length, m.kv_dtype, m.device);
    s.capacity = rows;
  }
  args.insert(args.end(), s.past.begin(), s.past.end());
  std::vector<ffi::Tensor> outs = m.Call(args, m.kv_inplace && seq == 1);
  const ffi::Tensor& logits = outs[0];  // [1, seq, vocab]
  if (logits.ndim() != 3 || logits.size(1) != seq || logits.size(2) != s.vocab || logits.device().device_type != kDLCPU)
    throw Error(m.path + ": unexpected logits shape from the decoder");
  const float* last = reinterpret_cast<const float*>(static_cast<const char*>(logits.data_ptr()) + logits.byte_offset()) +
                      (seq - 1) * s.vocab;
  if (!m.kv_inplace) s.past.assign(outs.begin() + 1, outs.end());
  s.length = total;
  return std::vector<float>(last, last + s.vocab);
}

int64_t LMSession::Length() const { return impl_->length; }
int64_t LMSession::vocab_size() const { return impl_->vocab; }
const std::vector<int64_t>& LMSession::eos_token_ids() const { return impl_->eos; }

}  // namespace shiftc
