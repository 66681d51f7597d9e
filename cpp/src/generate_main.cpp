// hmu_generate (--encoder FILE --decoder FILE | --build DIR [--precision fp32|int8|int4])
//              --inputs DIR --outputs DIR [--backend ort|trt]
//              [--max-new-tokens N] [--eos-id N] [--bos-id N] [--threads N]
//
// Greedy generation over a build's split graphs: DIR/src_ids.npy, DIR/src_mask.npy and
// DIR/noise.npy in (noise.npy may be left out: zeros, the HMU's mean path), the encoder once,
// then decoder steps with the KV cache kept in the runtime's own buffers. Writes
// <outputs>/tokens.npy (int64 [batch, longest], padded with -1) and <outputs>/lengths.npy
// (int64 [batch]) and prints one JSON line. Every failure prints one line on stderr and exits 2.
// The graphs are checked against the sha256 their build's manifest.json lists first
// (--no-verify skips it); NaN or infinite logits fail the run, naming the row and the step.
// --build picks a build folder's graphs of one precision (the quantize stage's int8 / int4 files
// run in the same ONNX Runtime loop: they are ordinary ONNX graphs), so a user never spells the
// file names, and a build without them is refused in one line that says why (its manifest).
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "hmu/error.hpp"
#include "hmu/generator.hpp"
#include "hmu/verify.hpp"

namespace {

constexpr int kUserError = 2;

const char* const kUsage =
    "usage: hmu_generate (--encoder FILE --decoder FILE | --build DIR [--precision P])\n"
    "                    --inputs DIR --outputs DIR\n"
    "                    [--backend ort|trt] [--max-new-tokens N] [--eos-id N] [--bos-id N]\n"
    "                    [--threads N] [--greedy] [--no-verify]\n"
    "  --encoder / --decoder  encoder.onnx + decoder.onnx (ort) or their TensorRT plans (trt)\n"
    "                         from one hmu_export build (any precision: encoder.int8.onnx ...)\n"
    "  --build     a build folder: runs its encoder / decoder graphs of --precision (ort)\n"
    "  --precision fp32 (encoder.onnx + decoder.onnx, the default), int8 (*.int8.onnx: int8\n"
    "              weights, dynamic int8 activations) or int4 (*.int4.onnx: int4 weight-only,\n"
    "              MatMulNBits), as the build's quantize stage wrote them; needs --build\n"
    "  --inputs    folder with src_ids.npy, src_mask.npy (int64 [batch, src_len]) and noise.npy\n"
    "              (float32 [batch, src_len, latent]; absent = zeros, the mean path)\n"
    "  --outputs   folder that receives tokens.npy and lengths.npy (created if missing)\n"
    "  --backend   ort | trt (default: trt for .plan/.engine files, else ort)\n"
    "  --max-new-tokens / --eos-id / --bos-id  override the graph's [generation] config\n"
    "  --threads   intra-op threads for ONNX Runtime (default: its own choice)\n"
    "  --greedy    decode greedily even if the build's default strategy is beam / sample\n"
    "  --no-verify run graphs that have no manifest.json beside them, or that differ from it\n"
    "              (default: both files must match the sha256 their build's manifest lists)\n"
    "  The build's token rules ([generation]: repetition penalty, no-repeat n-grams, bad\n"
    "  words, min / forced tokens, suppressed tokens) always apply, as in Python.\n";

struct Args {
  std::string encoder, decoder, inputs, outputs, backend, build, precision;
  hmu::GenerateOptions gen;
  int threads = 0;
  bool verify = true;
};

bool is_dir(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_file(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
std::string name_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

int64_t parse_int(const std::string& flag, const std::string& text, int64_t lo) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE || n < lo)
    throw hmu::Error(flag + " must be an integer >= " + std::to_string(lo) + ", got '" + text +
                     "'");
  return n;
}

// The precisions --build knows, as the build names their files (core/layout.py:
// <stem>[.<variant>].onnx).
const char* const kPrecisions[][2] = {{"fp32", ""}, {"int8", ".int8"}, {"int4", ".int4"}};

// --build DIR [--precision P] -> --encoder / --decoder; one line on a contradiction, or on a
// build that lacks the precision's graphs (with its quantize stage's status from the manifest).
void pick_build_graphs(Args& a) {
  if (a.build.empty()) {
    if (!a.precision.empty())
      throw hmu::Error("--precision needs --build DIR (with --encoder / --decoder the files "
                       "you name are the precision)");
    return;
  }
  if (!a.encoder.empty() || !a.decoder.empty())
    throw hmu::Error("give --build DIR or --encoder / --decoder, not both");
  if (!a.backend.empty() && a.backend != "ort")
    throw hmu::Error("--build runs the build's ONNX graphs (--backend ort); for TensorRT give "
                     "--encoder / --decoder plans");
  if (a.precision.empty()) a.precision = "fp32";
  const char* suffix = nullptr;
  for (const auto& p : kPrecisions)
    if (a.precision == p[0]) suffix = p[1];
  if (!suffix)
    throw hmu::Error("--precision must be fp32, int8 or int4, got '" + a.precision + "'");
  if (!is_dir(a.build)) throw hmu::Error("build folder not found: " + a.build);
  const std::string enc = a.build + "/encoder" + suffix + ".onnx";
  const std::string dec = a.build + "/decoder" + suffix + ".onnx";
  if (!is_file(enc) || !is_file(dec)) {
    std::string why;
    if (a.precision == "fp32") {
      why = "not a build of a generation model (generation.split_graphs = false?)";
    } else {
      const std::string stage = hmu::manifest_stage_note(a.build, "quantize");
      why = stage.empty() ? "the build has no quantize stage (built without it, or before it "
                            "existed): rebuild with [int8] enabled = true"
            : stage.rfind("ok", 0) == 0 ? "its quantize stage wrote no " + a.precision +
                                              " graphs (int8.int4 = false?)"
                                        : "its quantize stage " + stage;
    }
    throw hmu::Error(a.build + " has no " + name_of(enc) + " / " + name_of(dec) + ": " + why);
  }
  a.encoder = enc;
  a.decoder = dec;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (flag == "--greedy") {
      a.gen.greedy_anyway = true;
      continue;
    }
    if (flag == "--no-verify") {
      a.verify = false;
      continue;
    }
    std::string* slot = flag == "--encoder"   ? &a.encoder
                        : flag == "--decoder" ? &a.decoder
                        : flag == "--inputs"  ? &a.inputs
                        : flag == "--outputs" ? &a.outputs
                        : flag == "--backend" ? &a.backend
                        : flag == "--build"   ? &a.build
                        : flag == "--precision" ? &a.precision
                                              : nullptr;
    std::string number;
    const bool numeric = flag == "--max-new-tokens" || flag == "--eos-id" ||
                         flag == "--bos-id" || flag == "--threads";
    if (numeric) slot = &number;
    if (!slot) throw hmu::Error("unknown argument '" + flag + "' (see --help)");
    if (i + 1 >= argc) throw hmu::Error(flag + " needs a value");
    *slot = argv[++i];
    if (flag == "--max-new-tokens") a.gen.max_new_tokens = parse_int(flag, number, 1);
    if (flag == "--eos-id") a.gen.eos_id = parse_int(flag, number, 0);
    if (flag == "--bos-id") a.gen.bos_id = parse_int(flag, number, 0);
    if (flag == "--threads") {
      const int64_t n = parse_int(flag, number, 1);
      if (n > 1024) throw hmu::Error("--threads must be at most 1024, got '" + number + "'");
      a.threads = static_cast<int>(n);
    }
  }
  pick_build_graphs(a);
  if (a.encoder.empty()) throw hmu::Error("missing --encoder (see --help)");
  if (a.decoder.empty()) throw hmu::Error("missing --decoder (see --help)");
  if (a.inputs.empty()) throw hmu::Error("missing --inputs (see --help)");
  if (a.outputs.empty()) throw hmu::Error("missing --outputs (see --help)");
  if (a.backend.empty())
    a.backend = ends_with(a.decoder, ".plan") || ends_with(a.decoder, ".engine") ? "trt" : "ort";
  if (a.backend != "ort" && a.backend != "trt")
    throw hmu::Error("--backend must be ort or trt, got '" + a.backend + "'");
  return a;
}

// --precision, else what the decoder's file name says (the build's <stem>.<variant>.<ext>).
std::string precision_of(const Args& a) {
  if (!a.precision.empty()) return a.precision;
  const std::string name = name_of(a.decoder);
  for (const char* v : {"int8", "int4", "fp16", "opt"})
    if (name.find(std::string(".") + v + ".") != std::string::npos) return v;
  return "fp32";
}

int run(const Args& a) {
  if (!is_file(a.encoder)) throw hmu::Error("encoder file not found: " + a.encoder);
  if (!is_file(a.decoder)) throw hmu::Error("decoder file not found: " + a.decoder);
  if (!is_dir(a.inputs)) throw hmu::Error("inputs folder not found: " + a.inputs);
  // The graphs must be the build's own (manifest.json beside them lists their sha256) before
  // anything runs them; --no-verify is the explicit way round.
  if (a.verify) hmu::verify_against_manifest({a.encoder, a.decoder}, "--no-verify");
  std::unique_ptr<hmu::StepRunner> runner =
      a.backend == "trt" ? hmu::make_trt_step_runner(a.encoder, a.decoder)
                         : hmu::make_ort_step_runner(a.encoder, a.decoder, a.threads);
  const hmu::GeneratorInfo& info = runner->info();

  std::string missing;
  for (const char* name : {"src_ids", "src_mask"})
    if (!is_file(a.inputs + "/" + name + ".npy"))
      missing += (missing.empty() ? "" : ", ") + std::string(name);
  if (!missing.empty())
    throw hmu::Error("missing input(s): " + missing + " (no <name>.npy in " + a.inputs + ")");
  hmu::Feeds feeds;
  for (const char* name : {"src_ids", "src_mask"})
    feeds[name] = hmu::read_npy(a.inputs + "/" + name + ".npy");
  const std::string noise_path = a.inputs + "/noise.npy";
  if (is_file(noise_path)) {
    feeds["noise"] = hmu::read_npy(noise_path);
  } else {  // the mean path; shaped from src_ids so the validator reports any src_ids problem
    const hmu::Array& ids = feeds["src_ids"];
    int64_t latent = -1;
    for (const auto& spec : info.encoder.contract.inputs)
      if (spec.name == "noise" && spec.dims.size() == 3) latent = spec.dims[2].size;
    if (ids.shape.size() == 2 && latent > 0) {
      hmu::Array& noise = feeds["noise"];
      noise.dtype = "float32";
      noise.shape = {ids.shape[0], ids.shape[1], latent};
      noise.data.assign(static_cast<size_t>(noise.numel()) * noise.itemsize(), 0);
    }
  }

  const hmu::GenerateResult res = hmu::generate_greedy(*runner, feeds, a.gen);

  const int64_t batch = static_cast<int64_t>(res.sequences.size());
  int64_t longest = 0, total = 0;
  for (const auto& s : res.sequences) {
    longest = std::max<int64_t>(longest, static_cast<int64_t>(s.size()));
    total += static_cast<int64_t>(s.size());
  }
  hmu::Array tokens{"int64", {batch, longest}, {}};
  tokens.data.resize(static_cast<size_t>(batch * longest) * sizeof(int64_t));
  hmu::Array lengths{"int64", {batch}, {}};
  lengths.data.resize(static_cast<size_t>(batch) * sizeof(int64_t));
  for (int64_t r = 0; r < batch; ++r) {
    const auto& s = res.sequences[r];
    lengths.as<int64_t>()[r] = static_cast<int64_t>(s.size());
    for (int64_t c = 0; c < longest; ++c)
      tokens.as<int64_t>()[r * longest + c] = c < static_cast<int64_t>(s.size()) ? s[c] : -1;
  }
  if (!is_dir(a.outputs) && mkdir(a.outputs.c_str(), 0777) != 0 && errno != EEXIST)
    throw hmu::Error("cannot create outputs folder " + a.outputs + ": " + std::strerror(errno));
  hmu::write_npy(a.outputs + "/tokens.npy", tokens);
  hmu::write_npy(a.outputs + "/lengths.npy", lengths);
  std::printf(
      "{\"backend\": \"%s\", \"precision\": \"%s\", \"batch\": %lld, \"steps\": %lld, \"new_tokens\": %lld, "
      "\"seconds\": %.6f, \"ttft_ms\": %.3f, \"tokens_per_s\": %.2f, \"cache\": {\"layers\": "
      "%lld, \"heads\": %lld, \"head_dim\": %lld}}\n",
      runner->name().c_str(), precision_of(a).c_str(), static_cast<long long>(batch), static_cast<long long>(res.steps),
      static_cast<long long>(total), res.seconds, res.first_token_seconds * 1e3,
      res.seconds > 0 ? total / res.seconds : 0.0, static_cast<long long>(info.cache.layers),
      static_cast<long long>(info.cache.heads), static_cast<long long>(info.cache.head_dim));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const hmu::Error& e) {
    std::fprintf(stderr, "hmu_generate: error: %s\n", hmu::first_line(e.what()).c_str());
    return kUserError;
  } catch (const std::exception& e) {  // a bug or an unexpected runtime failure: still one line
    std::fprintf(stderr, "hmu_generate: internal error: %s\n", hmu::first_line(e.what()).c_str());
    return 1;
  }
}
