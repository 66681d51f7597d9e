// The I/O contract (names, dtypes, dims) and the shape validation of hmu_export/core/io_contract.py.
//
// Messages match Python's validate_feeds word for word where the concepts are the same, so a
// user sees the same error from the CLI, the Python runners and this program.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "hmu/npy.hpp"

namespace hmu {

struct Dim {
  int64_t size = -1;  // fixed size, or -1 when dynamic
  std::string name;   // dynamic axis name ("batch", "src_len", "tgt_len"), empty when fixed
  bool dynamic() const { return size < 0; }
};

struct TensorSpec {
  std::string name;
  std::string dtype;  // numpy dtype name
  std::vector<Dim> dims;
};

struct Contract {
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
};

// min / opt / max per dynamic axis; an axis missing from the map is unconstrained.
struct Profile {
  std::map<std::string, std::array<int64_t, 3>> axes;
};

struct ModelInfo {
  Contract contract;
  std::vector<Profile> profiles;  // a feed must fit at least one (empty = no profile check)
  int64_t vocab_size = -1;        // -1 = unknown (no token-id range check)
};

using Feeds = std::map<std::string, Array>;

// Throws hmu::Error naming the first violation, in the order Python checks them.
void validate_feeds(const ModelInfo& info, const Feeds& feeds);

// Index of the tightest profile that holds the feeds' dynamic sizes: the smallest product of
// max sizes over the profile's axes, the lowest index on a tie (hmu_export's select_profile in
// runners/tensorrt_runner.py). A profile made for short requests has kernels tuned for them,
// while the first ([profile]) one covers everything. An axis a profile does not name is
// unconstrained. Throws hmu::Error when no profile holds the shape.
int pick_profile(const std::vector<Profile>& profiles, const Contract& contract,
                 const Feeds& feeds);

// Profile(s) from a build config JSON ({"profile": {...}, "model": {...}}) as written in the
// graph's "hmu_export.config" metadata or manifest.json's "config".
std::vector<Profile> profiles_from_config(const class Json& config, const std::string& where);
int64_t vocab_from_config(const class Json& config, const std::string& where);

// Python-style rendering of a dims list: ['batch', 'src_len', 16]
std::string dims_str(const std::vector<Dim>& dims);

}  // namespace hmu
