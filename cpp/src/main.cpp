// hmu_infer --model FILE --inputs DIR --outputs DIR [--backend ort|trt] [--threads N]
//
// Reads DIR/<input name>.npy for every graph input, validates the feeds against the I/O
// contract and shape profile (the checks of hmu_export/core/io_contract.py), runs, and writes
// <outputs>/<output name>.npy. Every failure prints one line on stderr and exits 2.
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "hmu/backend.hpp"
#include "hmu/error.hpp"

namespace {

constexpr int kUserError = 2;

const char* const kUsage =
    "usage: hmu_infer --model FILE --inputs DIR --outputs DIR [--backend ort|trt] [--threads N]\n"
    "  --model    model.onnx (ort) or a TensorRT plan (trt) from an hmu_export build\n"
    "  --inputs   folder holding <input name>.npy for every graph input\n"
    "  --outputs  folder that receives <output name>.npy (created if missing)\n"
    "  --backend  ort | trt (default: trt for .plan/.engine files, else ort)\n"
    "  --threads  intra-op threads for ONNX Runtime (default: its own choice)\n";

struct Args {
  std::string model, inputs, outputs, backend;
  int threads = 0;
};

bool is_dir(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_file(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    std::string* slot = flag == "--model"     ? &a.model
                        : flag == "--inputs"  ? &a.inputs
                        : flag == "--outputs" ? &a.outputs
                        : flag == "--backend" ? &a.backend
                                              : nullptr;
    std::string threads;
    if (flag == "--threads") slot = &threads;
    if (!slot) throw hmu::Error("unknown argument '" + flag + "' (see --help)");
    if (i + 1 >= argc) throw hmu::Error(flag + " needs a value");
    *slot = argv[++i];
    if (flag == "--threads") {
      char* end = nullptr;
      long n = std::strtol(threads.c_str(), &end, 10);
      if (threads.empty() || *end != '\0' || n < 1 || n > 1024)
        throw hmu::Error("--threads must be a positive integer, got '" + threads + "'");
      a.threads = static_cast<int>(n);
    }
  }
  if (a.model.empty()) throw hmu::Error("missing --model (see --help)");
  if (a.inputs.empty()) throw hmu::Error("missing --inputs (see --help)");
  if (a.outputs.empty()) throw hmu::Error("missing --outputs (see --help)");
  if (a.backend.empty())
    a.backend = ends_with(a.model, ".plan") || ends_with(a.model, ".engine") ? "trt" : "ort";
  if (a.backend != "ort" && a.backend != "trt")
    throw hmu::Error("--backend must be ort or trt, got '" + a.backend + "'");
  return a;
}

int run(const Args& a) {
  if (!is_file(a.model)) throw hmu::Error("model file not found: " + a.model);
  if (!is_dir(a.inputs)) throw hmu::Error("inputs folder not found: " + a.inputs);
  hmu::BackendOptions opts;
  opts.threads = a.threads;
  std::unique_ptr<hmu::Backend> backend = a.backend == "trt"
                                              ? hmu::make_trt_backend(a.model, opts)
                                              : hmu::make_ort_backend(a.model, opts);
  const hmu::ModelInfo& info = backend->info();

  std::string missing;
  for (const auto& spec : info.contract.inputs)
    if (!is_file(a.inputs + "/" + spec.name + ".npy"))
      missing += (missing.empty() ? "" : ", ") + spec.name;
  if (!missing.empty())
    throw hmu::Error("missing input(s): " + missing + " (no <name>.npy in " + a.inputs + ")");
  hmu::Feeds feeds;
  for (const auto& spec : info.contract.inputs)
    feeds[spec.name] = hmu::read_npy(a.inputs + "/" + spec.name + ".npy");

  const auto t0 = std::chrono::steady_clock::now();
  hmu::Feeds outputs = backend->infer(feeds);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  if (!is_dir(a.outputs) && mkdir(a.outputs.c_str(), 0777) != 0 && errno != EEXIST)
    throw hmu::Error("cannot create outputs folder " + a.outputs + ": " + std::strerror(errno));
  std::string written;
  for (const auto& spec : info.contract.outputs) {
    const hmu::Array& arr = outputs.at(spec.name);
    hmu::write_npy(a.outputs + "/" + spec.name + ".npy", arr);
    written += (written.empty() ? "" : ", ") + spec.name + " " + hmu::shape_str(arr.shape) + " " +
               arr.dtype;
  }
  std::printf("hmu_infer: %s: wrote %s in %s (%.2f ms)\n", backend->name().c_str(),
              written.c_str(), a.outputs.c_str(), ms);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const hmu::Error& e) {
    std::fprintf(stderr, "hmu_infer: error: %s\n", hmu::first_line(e.what()).c_str());
    return kUserError;
  } catch (const std::exception& e) {  // a bug or an unexpected runtime failure: still one line
    std::fprintf(stderr, "hmu_infer: internal error: %s\n", hmu::first_line(e.what()).c_str());
    return 1;
  }
}
