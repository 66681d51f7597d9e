// SHA-256 (FIPS 180-4) and the manifest check of hmu/verify.hpp.
#include "hmu/verify.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {
namespace {

constexpr std::array<uint32_t, 64> kK = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

class Sha256 {
 public:
  void update(const unsigned char* data, size_t n) {
    total_ += n;
    while (n > 0) {
      const size_t take = std::min(n, size_t{64} - fill_);
      for (size_t i = 0; i < take; ++i) block_[fill_ + i] = data[i];
      fill_ += take;
      data += take;
      n -= take;
      if (fill_ == 64) {
        compress();
        fill_ = 0;
      }
    }
  }

  std::string hex() {
    const uint64_t bits = total_ * 8;
    const unsigned char one = 0x80, zero = 0;
    update(&one, 1);
    while (fill_ != 56) update(&zero, 1);
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(len, 8);
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
    return std::string(out, 64);
  }

 private:
  std::array<uint32_t, 8> h_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<unsigned char, 64> block_{};
  size_t fill_ = 0;
  uint64_t total_ = 0;

  void compress() {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t{block_[4 * i]} << 24) | (uint32_t{block_[4 * i + 1]} << 16) |
             (uint32_t{block_[4 * i + 2]} << 8) | uint32_t{block_[4 * i + 3]};
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6],
             h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          kK[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    const uint32_t add[8] = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) h_[i] += add[i];
  }
};

bool is_file(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

int64_t file_size(const std::string& p) {
  struct stat st{};
  return stat(p.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

std::string folder_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::string name_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

struct Listed {
  std::string sha256;
  int64_t bytes = -1;
};

Json read_manifest(const std::string& manifest) {
  std::ifstream in(manifest, std::ios::binary);
  if (!in) throw Error("cannot read " + manifest);
  std::stringstream text;
  text << in.rdbuf();
  return Json::parse(text.str(), manifest);
}

std::map<std::string, Listed> read_listing(const std::string& manifest) {
  const Json json = read_manifest(manifest);
  const Json* artifacts = json.find("artifacts");
  if (!artifacts || !artifacts->is_array())
    throw Error(manifest + " has no artifacts list: not a build's manifest");
  std::map<std::string, Listed> out;
  for (size_t i = 0; i < artifacts->array.size(); ++i) {
    const Json& row = artifacts->array[i];
    const Json* path = row.find("path");
    const Json* sha = row.find("sha256");
    const Json* bytes = row.find("bytes");
    if (!path || !path->is_string() || !sha || !sha->is_string())
      throw Error(manifest + ": artifacts[" + std::to_string(i) + "] has no path / sha256");
    out[path->string] = {sha->string, bytes ? bytes->as_int(manifest + ": bytes") : -1};
  }
  return out;
}

void check_one(const std::string& path, const std::string& manifest,
               const std::map<std::string, Listed>& listing) {
  const std::string name = name_of(path);
  const auto it = listing.find(name);
  if (it == listing.end())
    throw Error(name + " is not listed in " + manifest + ": not a file of that build");
  const int64_t size = file_size(path);
  if (it->second.bytes >= 0 && size != it->second.bytes)
    throw Error(path + " does not match " + manifest + ": " + std::to_string(size) +
                " bytes, the build wrote " + std::to_string(it->second.bytes) +
                " (the file changed after the build)");
  const std::string got = sha256_file(path);
  if (got != it->second.sha256)
    throw Error(path + " does not match " + manifest + ": sha256 " + got.substr(0, 12) +
                "..., the build wrote " + it->second.sha256.substr(0, 12) +
                "... (the file changed after the build)");
}

}  // namespace

std::string sha256_hex(const std::string& bytes) {
  Sha256 h;
  h.update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  return h.hex();
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  Sha256 h;
  std::array<char, 1 << 16> buf;
  while (in) {
    in.read(buf.data(), buf.size());
    h.update(reinterpret_cast<const unsigned char*>(buf.data()),
             static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) throw Error("cannot read " + path);
  return h.hex();
}

void verify_against_manifest(const std::vector<std::string>& files,
                             const std::string& no_verify_flag) {
  for (const std::string& path : files) {
    const std::string manifest = folder_of(path) + "/manifest.json";
    if (!is_file(manifest))
      throw Error("no manifest.json next to " + path + ": cannot check the graph against its "
                  "build (point at the graphs inside a build folder, or pass " + no_verify_flag +
                  " to run them unchecked)");
    const auto listing = read_listing(manifest);
    check_one(path, manifest, listing);
    const std::string data = path + ".data";  // external weights ONNX Runtime reads beside it
    if (is_file(data) || listing.count(name_of(data))) {
      if (!is_file(data))
        throw Error(data + " is listed in " + manifest + " but missing");
      check_one(data, manifest, listing);
    }
  }
}

std::string manifest_stage_note(const std::string& folder, const std::string& stage) {
  const std::string manifest = folder + "/manifest.json";
  if (!is_file(manifest)) return "";
  const Json json = read_manifest(manifest);
  const Json* stages = json.find("stages");
  const Json* row = stages ? stages->find(stage) : nullptr;
  if (!row) return "";
  const Json* status = row->find("status");
  const Json* reason = row->find("reason");
  std::string note = status && status->is_string() ? status->string : "?";
  if (reason && reason->is_string() && !reason->string.empty()) note += ": " + reason->string;
  return note;
}

}  // namespace hmu
