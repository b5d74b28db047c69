// shiftc_run: run a shiftc model library from C++ (the example to copy into your application).
//
//   shiftc_run info     MODEL.so                           signature and task
//   shiftc_run classify MODEL.so IMAGE.f32 [--top K] [--labels FILE]
//                        IMAGE.f32: raw float32 NCHW pixels, already preprocessed (1x3x224x224)
//   shiftc_run lm       MODEL.so --tokens 1,2,3 [--steps N] greedy decoding with the KV cache
//   shiftc_run dump     MODEL.so INPUTS.bin OUTPUTS.bin     run on tensors from a file, save outputs
//   common option: --threads N
//
// INPUTS.bin / OUTPUTS.bin ("SHT1" tensor files, little-endian): "SHT1", u32 count, then per
// tensor: u32 len + name, u32 len + dtype, u32 ndim, i64 dims[ndim], u64 nbytes, raw data.
#include <shiftc/runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

namespace {

std::string Dims(const shiftc::TensorInfo& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.shape.size(); ++i)
    s += (i ? ", " : "") + (t.shape[i] < 0 ? t.symbols[i] : std::to_string(t.shape[i]));
  return s + "]";
}

int Info(const shiftc::Model& model) {
  std::printf("%s: task %s\n", model.path().c_str(), model.task().c_str());
  for (const auto& t : model.inputs()) std::printf("  input  %-28s %-8s %s\n", t.name.c_str(), t.dtype.c_str(), Dims(t).c_str());
  for (const auto& t : model.outputs()) std::printf("  output %-28s %-8s %s\n", t.name.c_str(), t.dtype.c_str(), Dims(t).c_str());
  return 0;
}

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw shiftc::Error("cannot open '" + path + "'");
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

int Classify(shiftc::Model& model, const std::string& image, size_t top, const std::string& labels_path) {
  const shiftc::TensorInfo& in = model.inputs().at(0);
  std::vector<int64_t> shape = in.shape;
  for (int64_t& d : shape) d = d < 0 ? 1 : d;  // batch 1
  size_t count = static_cast<size_t>(std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>()));
  std::vector<char> bytes = ReadFile(image);
  if (bytes.size() != count * sizeof(float))
    throw shiftc::Error("'" + image + "' has " + std::to_string(bytes.size()) + " bytes; input '" + in.name +
                        "' needs " + std::to_string(count) + " float32 values");
  std::vector<float> pixels(count);
  std::memcpy(pixels.data(), bytes.data(), bytes.size());
  model.SetInput(in.name, pixels.data(), shape);
  model.Run();
  std::vector<float> logits = model.OutputFloats(model.outputs().at(0).name);

  std::vector<std::string> labels;
  if (!labels_path.empty()) {
    std::ifstream f(labels_path);
    for (std::string line; std::getline(f, line);) labels.push_back(line);
  }
  float max = *std::max_element(logits.begin(), logits.end()), sum = 0;
  for (float v : logits) sum += std::exp(v - max);
  std::vector<size_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  top = std::min(top, order.size());
  std::partial_sort(order.begin(), order.begin() + static_cast<long>(top), order.end(),
                    [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  for (size_t i = 0; i < top; ++i) {
    size_t c = order[i];
    std::printf("%2zu. class %4zu  logit %9.4f  prob %.4f%s%s\n", i + 1, c, logits[c], std::exp(logits[c] - max) / sum,
                c < labels.size() ? "  " : "", c < labels.size() ? labels[c].c_str() : "");
  }
  return 0;
}

int GenerateGreedy(shiftc::Model& model, const std::vector<int64_t>& prompt, int steps) {
  shiftc::LMSession session(model);
  const auto& eos = session.eos_token_ids();
  std::vector<float> logits = session.Step(prompt);  // prefill
  std::vector<int64_t> generated;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    int64_t next = std::max_element(logits.begin(), logits.end()) - logits.begin();
    generated.push_back(next);
    if (std::find(eos.begin(), eos.end(), next) != eos.end() || i + 1 == steps) break;
    logits = session.Step({next});
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("tokens:");
  for (int64_t t : generated) std::printf(" %lld", static_cast<long long>(t));
  // Tokens decoded one by one after the prefill (the first one comes from the prefill logits).
  size_t decoded = generated.empty() ? 0 : generated.size() - 1;
  std::printf("\n%zu tokens, %.1f tokens/s (decode), cache length %lld\n", generated.size(),
              secs > 0 ? static_cast<double>(decoded) / secs : 0.0, static_cast<long long>(session.Length()));
  return 0;
}

// -- SHT1 tensor files (dump mode) --------------------------------------------------------------

struct HostTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

template <typename T>
T Take(const std::vector<char>& buf, size_t& pos, size_t n = sizeof(T)) {
  if (pos + n > buf.size()) throw shiftc::Error("truncated tensor file");
  T v{};
  std::memcpy(&v, buf.data() + pos, sizeof(T));
  pos += n;
  return v;
}

std::string TakeString(const std::vector<char>& buf, size_t& pos) {
  uint32_t n = Take<uint32_t>(buf, pos);
  if (pos + n > buf.size()) throw shiftc::Error("truncated tensor file");
  pos += n;
  return std::string(buf.data() + pos - n, n);
}

std::vector<HostTensor> ReadTensors(const std::string& path) {
  std::vector<char> buf = ReadFile(path);
  size_t pos = 0;
  if (buf.size() < 8 || std::memcmp(buf.data(), "SHT1", 4) != 0) throw shiftc::Error("'" + path + "' is not an SHT1 tensor file");
  pos = 4;
  std::vector<HostTensor> out(Take<uint32_t>(buf, pos));
  for (HostTensor& t : out) {
    t.name = TakeString(buf, pos);
    t.dtype = TakeString(buf, pos);
    t.shape.resize(Take<uint32_t>(buf, pos));
    for (int64_t& d : t.shape) d = Take<int64_t>(buf, pos);
    uint64_t n = Take<uint64_t>(buf, pos);
    if (pos + n > buf.size()) throw shiftc::Error("truncated tensor file");
    t.data.assign(buf.begin() + static_cast<long>(pos), buf.begin() + static_cast<long>(pos + n));
    pos += n;
  }
  return out;
}

void WriteTensors(const std::string& path, const shiftc::Model& model) {
  std::ofstream f(path, std::ios::binary);
  auto put = [&](const void* p, size_t n) { f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n)); };
  auto put_str = [&](const std::string& s) {
    uint32_t n = static_cast<uint32_t>(s.size());
    put(&n, 4);
    put(s.data(), n);
  };
  uint32_t count = static_cast<uint32_t>(model.num_outputs());
  put("SHT1", 4);
  put(&count, 4);
  for (size_t i = 0; i < model.num_outputs(); ++i) {
    shiftc::TensorView v = model.Output(i);
    put_str(model.outputs()[i].name);
    put_str(v.dtype);
    uint32_t ndim = static_cast<uint32_t>(v.shape.size());
    uint64_t nbytes = v.nbytes;
    put(&ndim, 4);
    put(v.shape.data(), 8 * ndim);
    put(&nbytes, 8);
    put(v.data, v.nbytes);
  }
  if (!f) throw shiftc::Error("cannot write '" + path + "'");
}

int Dump(shiftc::Model& model, const std::string& in_path, const std::string& out_path) {
  for (const HostTensor& t : ReadTensors(in_path)) model.SetInput(t.name, t.data.data(), t.shape, t.dtype);
  model.Run();
  WriteTensors(out_path, model);
  std::printf("wrote %zu outputs to %s\n", model.num_outputs(), out_path.c_str());
  return 0;
}

int Usage() {
  std::fprintf(stderr,
               "usage: shiftc_run info     MODEL.so\n"
               "       shiftc_run classify MODEL.so IMAGE.f32 [--top K] [--labels FILE]\n"
               "       shiftc_run lm       MODEL.so --tokens 1,2,3 [--steps N]\n"
               "       shiftc_run dump     MODEL.so INPUTS.bin OUTPUTS.bin\n"
               "options: --threads N\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  std::string tokens, labels;
  int steps = 16, threads = 0;
  size_t top = 5;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      bool has_value = i + 1 < argc;
      if (a == "--top" && has_value) top = std::stoul(argv[++i]);
      else if (a == "--labels" && has_value) labels = argv[++i];
      else if (a == "--tokens" && has_value) tokens = argv[++i];
      else if (a == "--steps" && has_value) steps = std::stoi(argv[++i]);
      else if (a == "--threads" && has_value) threads = std::stoi(argv[++i]);
      else if (a.rfind("--", 0) == 0) return Usage();
      else pos.push_back(a);
    }
  } catch (const std::exception&) {
    return Usage();  // a non-numeric option value
  }
  if (pos.size() < 2) return Usage();
  const std::string& mode = pos[0];
  try {
    if (threads > 0) shiftc::Model::SetNumThreads(threads);
    shiftc::Model model = shiftc::Model::Load(pos[1]);
    if (mode == "info" && pos.size() == 2) return Info(model);
    if (mode == "classify" && pos.size() == 3) return Classify(model, pos[2], top, labels);
    if (mode == "dump" && pos.size() == 4) return Dump(model, pos[2], pos[3]);
    if (mode == "lm" && pos.size() == 2 && !tokens.empty()) {
      std::vector<int64_t> prompt;
      for (size_t at = 0; at < tokens.size();) {
        size_t comma = std::min(tokens.find(',', at), tokens.size());
        prompt.push_back(std::stoll(tokens.substr(at, comma - at)));
        at = comma + 1;
      }
      return GenerateGreedy(model, prompt, steps);
    }
    return Usage();
  } catch (const std::exception& e) {  // shiftc::Error, and std::stoll on a bad --tokens list
    std::fprintf(stderr, "shiftc_run: error: %s\n", e.what());
    return 1;
  }
}
